"""trio's SocketStream next to lbnode's FastSocketStream, one process, no network noise.

Two tasks ping-pong 100-byte messages over a socketpair: each round trip is
two ``send_all`` and two ``receive_some`` calls, the same four stream calls a
proxied request makes. trio's stream takes two scheduler traps per call even
when the socket is ready; ``lbnode/fastsock.py`` takes none unless the kernel
would block (and one per 16 ready calls, for fairness). Runs alternate
A, B, A, B so that a machine busy with something else penalises both.

    python bench/bench_streams.py [--rounds 20000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lbnode.fastsock import fast_stream  # noqa: E402


async def _round_trips(fast: bool, rounds: int) -> float:
    """Microseconds per round trip."""
    a, b = trio.socket.socketpair()
    sa: trio.abc.Stream = trio.SocketStream(a)
    sb: trio.abc.Stream = trio.SocketStream(b)
    if fast:
        sa, sb = fast_stream(trio.SocketStream(a)), fast_stream(trio.SocketStream(b))
    message = b"x" * 100

    async def echo() -> None:
        for _ in range(rounds):
            await sb.send_all(await sb.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        t0 = time.perf_counter()
        for _ in range(rounds):
            await sa.send_all(message)
            await sa.receive_some(65536)
        elapsed = time.perf_counter() - t0
    await sa.aclose()
    await sb.aclose()
    return elapsed / rounds * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    results: dict[str, list[float]] = {"trio": [], "fast": []}
    for _ in range(a.repeat):
        for name in ("trio", "fast"):
            results[name].append(trio.run(_round_trips, name == "fast", a.rounds))
    trio_us, fast_us = statistics.median(results["trio"]), statistics.median(results["fast"])
    if a.json:
        print(json.dumps({"trio_us": trio_us, "fast_us": fast_us, "ratio": trio_us / fast_us}))
        return 0
    print(f"round trip (2 sends + 2 receives), median of {a.repeat} x {a.rounds:,}:")
    print(f"  trio.SocketStream   {trio_us:7.1f} us")
    print(f"  FastSocketStream    {fast_us:7.1f} us   ({trio_us / fast_us:.2f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
