"""Traffic rules: which rule (if any) takes a request.

Theory of operation
-------------------
Order of checks on the data path, per request (each step is a pure decision
in ``lbnode.policy``; the data path calls them in this order and stops at
the first that answers)::

    1. access control   AccessPolicy.allows(client_ip) of the load balancer
                        (client_ip from access.client_ip_from: PROXY header,
                        then trusted X-Forwarded-For)           -> 403
    2. rule match       CompiledRules.match(req) -> Match | None; then the
                        matched rule's own ``access`` block     -> 403
    3. rate limit       the rule's RateLimiter if it has one, else the load
                        balancer's                              -> 429
    4. sticky lookup    the rule's StickyPolicy (or the LB's) and the pin store
    5. balancing        the rule's targets and algorithm, else the LB's
    6. forward

Rules are ordered (file order). The first rule whose conditions all hold
*and* whose weight split takes the request wins; a request no rule takes
goes to the load balancer's own targets (``match`` returns None). A rule's
conditions, all of which must hold:

* ``path``: a glob over the raw path (no query, no percent-decoding, no
  dot-segment removal): ``*`` matches any run of characters *including*
  ``/`` (``/api/v2/*`` takes everything under ``/api/v2/``), ``?`` exactly
  one character, anything else itself (``.``, ``[``, ``+`` are literal).
* ``method``: ``any`` or a list of methods.
* ``host``: the Host header without port, case-insensitive, exact or a glob
  with the same syntax (``*.example.com`` matches every subdomain at any
  depth, not ``example.com`` itself).
* ``header`` / ``query`` (one or a list of ``ValueMatch``): exact ``value``,
  ``regex`` (``re.search``: unanchored unless the pattern anchors itself,
  like HAProxy's ``hdr_reg``), ``present: false`` (must be absent), or
  present (the default). Header names are case-insensitive; a header that
  repeats matches if any of its values does. A query parameter that repeats
  is judged by its first value.
* ``client_cidr``: the client address is in one of the networks.
* ``weight: N``: the rule then takes N percent of what it matched, chosen by
  a stable hash of the split key (see ``lbnode.policy.split``); the rest
  fall through to later rules.

Indexing. Matching cost must not grow like a scan over every rule. At compile
time each path glob is cut at its first wildcard; the whole path segments of
that literal prefix (``/api/v2/*`` -> ``api``, ``v2``; ``/api/v2`` ->
``api``, ``v2``; ``/ap*`` -> none) place the rule on a node of a trie of
path segments. Rules without a path, or whose first segment already holds a
wildcard, live at the root. A request can only match rules on the nodes
along its own path, so each trie node stores, precomputed, the rules of the
root-to-node chain sorted by rule index. ``match`` walks the request's
segments down the trie (one dict lookup each) and tests the candidates of
the deepest node reached in rule order: first-match order is preserved
exactly, and with distinct path prefixes a request sees a handful of
candidates whatever the rule count. Each glob is compiled once into the
cheapest equivalent check (string equality, a prefix regex ``match``, or a
``fullmatch`` of the translated glob); nothing is compiled per request.
The request's own values are computed once per match, and only if a
candidate needs them: the lower-case host, the parsed client address, and a
header-name map that turns every header condition into one dict lookup.

``CompiledRules`` is immutable: a config change builds a new one and the
caller swaps the reference, so a request in flight keeps the rules it
started with. ``match`` returns a ``Match`` built at compile time (no
allocation per request) carrying the rule, its index, and the rule's
prebuilt ``AccessPolicy``, ``StickyPolicy`` and ``Split``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from .access import AccessPolicy, NetworkSet, parse_ip
from .request import RequestView
from .split import Split
from .sticky import StickyPolicy

if TYPE_CHECKING:
    from lbshared.config import LoadBalancer, Rule, ValueMatch

__all__ = ["CompiledRules", "Match", "compile_glob", "glob_to_regex"]

_WILDCARDS: Final = frozenset("*?")


# --------------------------------------------------------------------------
# Globs
# --------------------------------------------------------------------------


def glob_to_regex(glob: str) -> str:
    """Translate a rule glob to a regex for ``fullmatch`` (``*`` crosses ``/``)."""
    out: list[str] = []
    for ch in glob:
        if ch == "*":
            if not out or out[-1] != ".*":  # "**" is the same as "*"
                out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def compile_glob(glob: str, *, ignore_case: bool = False) -> Callable[[str], Any]:
    """The cheapest callable ``f(text)`` that is truthy iff ``text`` matches ``glob``.

    With ``ignore_case`` the pattern is lower-cased and the caller passes
    lower-case text.
    """
    if ignore_case:
        glob = glob.lower()
    first = min((i for i, ch in enumerate(glob) if ch in _WILDCARDS), default=-1)
    if first < 0:
        return glob.__eq__
    flags = re.DOTALL
    if first == len(glob) - 1 and glob[-1] == "*":
        # "literal*": a prefix test.
        return re.compile(re.escape(glob[:-1]), flags).match
    return re.compile(glob_to_regex(glob), flags).fullmatch


def _index_segments(glob: str) -> tuple[str, ...]:
    """The complete literal path segments a glob's matches must start with."""
    if not glob.startswith("/"):
        return ()
    first = min((i for i, ch in enumerate(glob) if ch in _WILDCARDS), default=-1)
    if first < 0:
        return tuple(glob[1:].split("/"))
    parts = glob[1:first].split("/")
    return tuple(parts[:-1])  # the last part runs into the wildcard


# --------------------------------------------------------------------------
# Compiled conditions
# --------------------------------------------------------------------------


def _as_list(v: ValueMatch | Sequence[ValueMatch] | None) -> list[ValueMatch]:
    if v is None:
        return []
    if isinstance(v, list | tuple):
        return list(v)
    return [v]  # type: ignore[list-item]


def _encode(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


class _HeaderCond:
    __slots__ = ("name", "kind", "value", "regex")

    def __init__(self, vm: ValueMatch) -> None:
        self.name = vm.name.lower().encode("latin-1")
        self.value = b""
        self.regex: re.Pattern[str] | None = None
        if vm.value is not None:
            self.kind = "value"
            self.value = _encode(vm.value)
        elif vm.regex is not None:
            self.kind = "regex"
            self.regex = re.compile(vm.regex)
        elif vm.present is False:
            self.kind = "absent"
        else:
            self.kind = "present"

    def holds(self, headers: _HeaderMap) -> bool:
        got = headers.get(self.name)
        kind = self.kind
        if kind == "present":
            return got is not None
        if kind == "absent":
            return got is None
        if got is None:
            return False
        if kind == "value":
            if isinstance(got, bytes):
                return got == self.value
            return self.value in got
        assert self.regex is not None
        search = self.regex.search
        if isinstance(got, bytes):
            return search(got.decode("latin-1")) is not None
        return any(search(v.decode("latin-1")) for v in got)


# Header name -> its value, or the list of its values when it repeats.
_HeaderMap = dict[bytes, "bytes | list[bytes]"]
_NO_HEADERS: Final[_HeaderMap] = {}


def _header_map(headers: Sequence[tuple[bytes, bytes]]) -> _HeaderMap:
    out: _HeaderMap = {}
    for k, v in headers:
        prev = out.get(k)
        if prev is None:
            out[k] = v
        elif isinstance(prev, list):
            prev.append(v)
        else:
            out[k] = [prev, v]
    return out


class _QueryCond:
    __slots__ = ("name", "kind", "value", "regex")

    def __init__(self, vm: ValueMatch) -> None:
        self.name = vm.name
        self.value = ""
        self.regex: re.Pattern[str] | None = None
        if vm.value is not None:
            self.kind = "value"
            self.value = vm.value
        elif vm.regex is not None:
            self.kind = "regex"
            self.regex = re.compile(vm.regex)
        elif vm.present is False:
            self.kind = "absent"
        else:
            self.kind = "present"

    def holds(self, req: RequestView) -> bool:
        got = req.query.get(self.name)
        kind = self.kind
        if kind == "present":
            return got is not None
        if kind == "absent":
            return got is None
        if got is None:
            return False
        if kind == "value":
            return got == self.value
        assert self.regex is not None
        return self.regex.search(got) is not None


def _methods(method: str | Sequence[str] | None) -> frozenset[bytes] | None:
    if method is None:
        return None
    items = [method] if isinstance(method, str) else list(method)
    if not items or any(m.strip().upper() == "ANY" for m in items):
        return None
    return frozenset(m.strip().upper().encode("ascii") for m in items)


class Match:
    """A rule that took a request, with its prebuilt per-rule policies.

    One ``Match`` per rule is built at compile time and returned as is.
    """

    __slots__ = ("rule", "index", "name", "access", "sticky", "split")

    rule: Rule
    index: int
    name: str
    access: AccessPolicy | None
    sticky: StickyPolicy | None
    split: Split | None

    def __init__(
        self,
        rule: Rule,
        index: int,
        name: str,
        access: AccessPolicy | None,
        sticky: StickyPolicy | None,
        split: Split | None,
    ) -> None:
        for slot, value in zip(
            Match.__slots__, (rule, index, name, access, sticky, split), strict=True
        ):
            object.__setattr__(self, slot, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Match is immutable")

    def __repr__(self) -> str:
        return f"Match(index={self.index}, name={self.name!r})"


class _CompiledRule:
    """One rule's conditions, cheapest first."""

    __slots__ = (
        "match",
        "methods",
        "host",
        "path",
        "cidr",
        "headers",
        "queries",
        "split",
        "needs_host",
        "needs_addr",
        "needs_headers",
    )

    def __init__(self, rule: Rule, index: int, name: str, sticky_enabled: bool) -> None:
        self.methods = _methods(rule.method)
        self.host = compile_glob(rule.host, ignore_case=True) if rule.host else None
        self.path = compile_glob(rule.path) if rule.path is not None else None
        cidrs = list(rule.client_cidr or ())
        self.cidr = NetworkSet(cidrs) if cidrs else None
        self.headers = tuple(_HeaderCond(vm) for vm in _as_list(rule.header))
        self.queries = tuple(_QueryCond(vm) for vm in _as_list(rule.query))
        weight = rule.weight
        self.split = (
            Split(name, weight, rule.split_key or "client_ip")
            if weight is not None and weight < 100
            else None
        )
        self.needs_host = self.host is not None
        self.needs_addr = self.cidr is not None
        self.needs_headers = bool(self.headers)
        access = AccessPolicy.from_config(rule.access) if rule.access is not None else None
        sticky = (
            StickyPolicy.from_config(name, rule.sticky_session)
            if sticky_enabled and rule.sticky_session is not None
            else None
        )
        self.match = Match(rule, index, name, access, sticky, self.split)

    def takes(self, req: RequestView, path: str, host: str, addr: Any, headers: _HeaderMap) -> bool:
        methods = self.methods
        if methods is not None and req.method not in methods:
            return False
        if self.host is not None and not self.host(host):
            return False
        if self.path is not None and not self.path(path):
            return False
        if self.cidr is not None and (addr is None or not self.cidr.contains_address(addr)):
            return False
        for h in self.headers:
            if not h.holds(headers):
                return False
        for q in self.queries:
            if not q.holds(req):
                return False
        split = self.split
        return split is None or split.takes(req)


class _Node:
    __slots__ = ("children", "own", "candidates", "needs_host", "needs_addr", "needs_headers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.own: list[_CompiledRule] = []
        self.candidates: tuple[_CompiledRule, ...] = ()
        self.needs_host = False
        self.needs_addr = False
        self.needs_headers = False


def _finish(node: _Node, inherited: list[_CompiledRule]) -> None:
    chain = sorted(inherited + node.own, key=lambda c: c.match.index)
    node.candidates = tuple(chain)
    node.needs_host = any(c.needs_host for c in chain)
    node.needs_addr = any(c.needs_addr for c in chain)
    node.needs_headers = any(c.needs_headers for c in chain)
    for child in node.children.values():
        _finish(child, chain)


# --------------------------------------------------------------------------
# The compiled rule set
# --------------------------------------------------------------------------


class CompiledRules:
    """An immutable, indexed, ordered rule set. Build once per config."""

    __slots__ = ("rules", "matches", "_root")

    rules: tuple[Rule, ...]
    matches: tuple[Match, ...]
    _root: _Node

    def __init__(
        self,
        rules: Mapping[str, Rule] | Iterable[Rule] = (),
        *,
        sticky_enabled: bool = True,
    ) -> None:
        if isinstance(rules, Mapping):
            named = [(key, rule) for key, rule in rules.items()]
        else:
            named = [(rule.name, rule) for rule in rules]
        root = _Node()
        compiled: list[_CompiledRule] = []
        for index, (key, rule) in enumerate(named):
            name = rule.name or key
            c = _CompiledRule(rule, index, name, sticky_enabled)
            compiled.append(c)
            node = root
            for seg in _index_segments(rule.path) if rule.path is not None else ():
                node = node.children.setdefault(seg, _Node())
            node.own.append(c)
        _finish(root, [])
        object.__setattr__(self, "rules", tuple(rule for _, rule in named))
        object.__setattr__(self, "matches", tuple(c.match for c in compiled))
        object.__setattr__(self, "_root", root)

    @classmethod
    def for_load_balancer(cls, lb: LoadBalancer) -> CompiledRules:
        """The rules of ``lb`` (honours ``sticky_sessions: false``)."""
        return cls(lb.rules, sticky_enabled=lb.sticky_sessions)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("CompiledRules is immutable")

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"CompiledRules({[m.name for m in self.matches]!r})"

    def candidates(self, path: str) -> tuple[Match, ...]:
        """The rules a request for ``path`` is tested against, in order (for tests)."""
        return tuple(c.match for c in self._node_for(path).candidates)

    def _node_for(self, path: str) -> _Node:
        node = self._root
        if path[:1] == "/" and node.children:
            children = node.children
            for seg in path[1:].split("/"):
                child = children.get(seg)
                if child is None:
                    break
                node = child
                children = child.children
                if not children:
                    break
        return node

    def match(self, req: RequestView, now: float | None = None) -> Match | None:
        """The first rule that takes ``req``, or None (use the LB's targets).

        ``now`` is accepted for interface symmetry; matching is timeless.
        """
        path = req.path
        node = self._node_for(path)
        host = req.host if node.needs_host else ""
        addr = parse_ip(req.client_ip) if node.needs_addr else None
        # Header conditions look names up in one map built per request.
        headers = _header_map(req.headers) if node.needs_headers else _NO_HEADERS
        for c in node.candidates:
            if c.takes(req, path, host, addr, headers):
                return c.match
        return None
