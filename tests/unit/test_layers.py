"""The import direction of DESIGN.md's layers, enforced on the source (AST).

The pure layers (``lbnode.policy`` and the pure half of ``lbshared``) never
import I/O (trio, sockets, TLS, asyncio, selectors, Redis, h11) nor the I/O
half of ``lbnode``; ``lbnode.policy`` imports nothing from ``lbnode`` outside
itself; ``lbshared`` never imports ``lbnode``. Every import statement counts,
also those under ``if TYPE_CHECKING:`` or inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN_IO = ("trio", "socket", "ssl", "asyncio", "selectors", "redis", "h11", "hiredis")
FORBIDDEN_LBNODE = ("lbnode.proxy", "lbnode.node", "lbnode.upstream", "lbnode.listeners",
                    "lbnode.admin")  # fmt: skip

# lbshared is two halves, listed here by hand so that a new module is placed
# consciously (test_every_lbshared_module_is_classified fails until it is).
# Pure: models and folds that nodes and lbctl share, testable without I/O.
LBSHARED_PURE = ("__init__", "config", "durations", "errors", "docgen", "events", "projections",
                 "redis_url")  # fmt: skip
# I/O: the trio Redis client, the event-log store, publishing over Redis, lbctl.
LBSHARED_IO = ("redis_trio", "store", "publish", "lbctl", "lbctl_views")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a file under ``root``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                prefix = ".".join(base)
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # `from pkg import sub` may import a submodule.
            out.extend((node.lineno, f"{mod}.{alias.name}") for alias in node.names)
    return out


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def policy_modules() -> list[Path]:
    return sorted((ROOT / "lbnode" / "policy").rglob("*.py"))


def lbshared_pure_modules() -> list[Path]:
    return [p for name in LBSHARED_PURE if (p := ROOT / "lbshared" / f"{name}.py").exists()]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_checked_modules_exist() -> None:
    assert {p.stem for p in policy_modules()} >= {"__init__", "balancing", "keys", "request"}
    assert {p.stem for p in lbshared_pure_modules()} >= {"config", "durations", "errors", "docgen"}


def test_every_lbshared_module_is_classified() -> None:
    found = {p.stem for p in (ROOT / "lbshared").glob("*.py")}
    unclassified = found - set(LBSHARED_PURE) - set(LBSHARED_IO)
    assert not unclassified, (
        f"classify lbshared/{sorted(unclassified)} as pure or I/O in tests/unit/test_layers.py"
    )


@pytest.mark.parametrize("path", policy_modules() + lbshared_pure_modules(), ids=rel)
def test_pure_layers_import_no_io(path: Path) -> None:
    bad = [(line, mod) for line, mod in imports_of(path)
           if under(mod, FORBIDDEN_IO) or under(mod, FORBIDDEN_LBNODE)]  # fmt: skip
    assert not bad, f"{rel(path)} imports I/O: {bad}"


@pytest.mark.parametrize("path", policy_modules(), ids=rel)
def test_policy_imports_only_policy_from_lbnode(path: Path) -> None:
    bad = [(line, mod) for line, mod in imports_of(path)
           if under(mod, ("lbnode",)) and not under(mod, ("lbnode.policy",))]  # fmt: skip
    assert not bad, f"{rel(path)} imports from lbnode outside lbnode.policy: {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "lbshared").glob("*.py")), ids=rel)
def test_lbshared_never_imports_lbnode(path: Path) -> None:
    bad = [(line, mod) for line, mod in imports_of(path) if under(mod, ("lbnode",))]
    assert not bad, f"{rel(path)} imports lbnode, a layer above it: {bad}"


# The checker itself, on small sources.
CHECKER_CASES = [
    ("import trio\n", "lbnode/policy/x.py", ["trio"]),
    ("import socket as s\n", "lbnode/policy/x.py", ["socket"]),
    ("from ssl import SSLContext\n", "lbnode/policy/x.py", ["ssl", "ssl.SSLContext"]),
    ("from .. import proxy\n", "lbnode/policy/x.py", ["lbnode", "lbnode.proxy"]),
    ("from ..upstream import UpstreamPool\n", "lbnode/policy/x.py",
     ["lbnode.upstream", "lbnode.upstream.UpstreamPool"]),
    ("from .keys import KeySpec\n", "lbnode/policy/x.py",
     ["lbnode.policy.keys", "lbnode.policy.keys.KeySpec"]),
    ("def f():\n    import redis.asyncio\n", "lbshared/x.py", ["redis.asyncio"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import h11\n", "lbshared/x.py",
     ["typing", "typing.TYPE_CHECKING", "h11"]),
]  # fmt: skip


@pytest.mark.parametrize(("source", "where", "expected"), CHECKER_CASES)
def test_the_checker_sees_every_import(tmp_path: Path, source: str, where: str,
                                       expected: list[str]) -> None:  # fmt: skip
    # Laid out under a fake root, so that relative imports resolve as in the repo.
    path = tmp_path / where
    path.parent.mkdir(parents=True)
    path.write_text(source)
    assert [mod for _, mod in imports_of(path, tmp_path)] == expected
