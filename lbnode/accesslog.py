"""The access log: one JSON object a line (DESIGN.md's keys), to stdout or a
file. Lines are buffered and flushed by a background task a few times a
second, so logging costs the request path one ``json.dumps`` and a write to
memory."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

import trio

FLUSH_INTERVAL = 0.2

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class AccessLog:
    def __init__(self, target: str) -> None:
        self.target = target
        self._file: IO[str] | None = None
        self._owned = False
        self.open()

    def open(self) -> None:
        if self.target == "-":
            self._file = sys.stdout
            self._owned = False
        else:
            self._file = open(self.target, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
            self._owned = True

    def reopen(self) -> None:
        """Reopen a file target (after logrotate moved it)."""
        if self._owned:
            self.close()
            self.open()

    def __call__(self, record: dict[str, Any]) -> None:
        f = self._file
        if f is not None:
            f.write(_dumps(record) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self.flush()
        if self._owned and self._file is not None:
            self._file.close()
        self._file = None

    async def flusher(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            self.flush()
