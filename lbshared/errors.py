"""Turning pydantic's validation errors into one line per problem, in the file's own words.

Pydantic reports an error as a ``loc`` tuple and a message written for
programmers (``Value error, ...``, ``Extra inputs are not permitted``, a URL).
An operator wants ``load_balancers[0].listeners[0].prot: unknown key (did you
mean 'protocol'?)``. This module does that translation:

* The ``loc`` is walked alongside the model's type annotations, starting at
  the root model. Walking the types tells which loc elements are pydantic's
  own (the tag of a discriminated union such as ``'one'``/``'many'`` or
  ``'http'``/``'tcp'``, the ``'[key]'`` marker of a bad mapping key) so they
  can be dropped, and which model an unknown key was found in, so the "did you
  mean" suggestion comes from that model's field names only.
* Cross-field checks (duplicate ids, unknown rule targets, ...) cannot point
  below the model that runs them, so they raise one ``PydanticCustomError`` of
  type ``config_problems`` whose context carries ``(sub_loc, message)`` pairs;
  each pair becomes its own line here.
* The caller may re-map the cleaned loc (the single-``load_balancer:`` file
  form is validated as a one-element ``load_balancers`` list, but its
  problems must read ``load_balancer.targets[1]``).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import AliasChoices, BaseModel, Tag, ValidationError

__all__ = [
    "ConfigError",
    "PROBLEMS_ERROR_TYPE",
    "format_path",
    "show",
    "suggest",
    "validation_problems",
]

Loc = tuple[str | int, ...]

#: Error type of the ``PydanticCustomError`` that carries several cross-field problems.
PROBLEMS_ERROR_TYPE = "config_problems"

_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+\Z")
_NOISE_RE = re.compile(
    r"^(Value error|Assertion failed), |\s*\[type=.*$|\s*For further information.*$"
)


class ConfigError(Exception):
    """A configuration was refused; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(self.problems)  # args stay (problems,) so it pickles back whole

    def __str__(self) -> str:
        return "\n".join(self.problems)


def show(value: object) -> str:
    """A value as the problem message names it: YAML words for scalars, a kind for containers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str | int | float):
        return repr(value)
    return type(value).__name__


def format_path(loc: Loc) -> str:
    """``('load_balancers', 0, 'targets', 1)`` -> ``load_balancers[0].targets[1]``."""
    out: list[str] = []
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _PLAIN_KEY_RE.match(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{part!r}]")
    return "".join(out) or "(top level)"


# -- walking a loc through the annotations ---------------------------------------------------


def _strip(tp: Any) -> Any:
    """Remove ``Annotated`` and ``| None`` wrappers that never appear in a loc."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            members = [m for m in typing.get_args(tp) if m is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _tagged_members(tp: Any) -> dict[str, Any]:
    """For a discriminated union, ``{tag: member type}``; empty for anything else."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return {}
    tags: dict[str, Any] = {}
    for member in typing.get_args(tp):
        if typing.get_origin(member) is typing.Annotated:
            for meta in typing.get_args(member)[1:]:
                if isinstance(meta, Tag):
                    tags[meta.tag] = member
    return tags


def _model_field(model: type[BaseModel], key: str) -> Any:
    for name, field in model.model_fields.items():
        if key == name or key in _aliases(field.validation_alias):
            return field.annotation
    return None


def _aliases(alias: object) -> list[str]:
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [c for c in alias.choices if isinstance(c, str)]
    return []


def _known_keys(model: type[BaseModel]) -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        keys.append(name)
        keys.extend(a for a in _aliases(field.validation_alias) if a != name)
    return keys


def _walk(root: Any, loc: Loc) -> tuple[Loc, Any]:
    """Drop pydantic's own loc elements; return the clean loc and the type of its parent."""
    clean: list[str | int] = []
    tp: Any = root
    parent: Any = None
    for part in loc:
        tp = _strip(tp)
        tagged = _tagged_members(tp)
        if tagged and isinstance(part, str) and part in tagged:
            tp = tagged[part]
            continue
        if part == "[key]":
            continue
        parent = tp
        clean.append(part)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            tp = _model_field(tp, part)
        elif typing.get_origin(tp) in (list, tuple) and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            tp = None
    return tuple(clean), _strip(parent)


def suggest(key: str, candidates: Sequence[str]) -> str | None:
    """The known key an unknown ``key`` most likely meant: an abbreviation first, then a typo."""
    if len(key) >= 3:
        longer = sorted((c for c in candidates if c.startswith(key)), key=len)
        if longer:
            return longer[0]
    close = difflib.get_close_matches(key, candidates, n=1)
    return close[0] if close else None


# -- messages ------------------------------------------------------------------------------------


def _message(err: Any, parent: Any, key: str | int | None) -> str:
    kind: str = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        hint = ""
        if isinstance(parent, type) and issubclass(parent, BaseModel) and isinstance(key, str):
            close = suggest(key, [k for k in _known_keys(parent) if k != key])
            if close:
                hint = f" (did you mean {close!r}?)"
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind in ("string_type", "string_sub_type"):
        return f"expected a string, got {show(value)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{show(value)} is not an integer"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"{show(value)} is not a number"
    if kind in ("bool_type", "bool_parsing"):
        return f"{show(value)} is not true or false"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {show(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, got {show(value)}"
    if kind == "union_tag_invalid":
        return f"{show(ctx.get('tag'))} is not one of {ctx.get('expected_tags', '?')}"
    if kind == "literal_error":
        return f"{show(value)} is not one of {ctx.get('expected', '?')}"
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"{show(value)} must be {bounds[kind]} {limit}"
    if kind in ("string_too_short", "too_short"):
        return f"{show(value)} is too short"
    return _NOISE_RE.sub("", str(err.get("msg", kind))).strip()


def validation_problems(
    exc: ValidationError,
    root: type[BaseModel],
    remap: Callable[[Loc], Loc] = lambda loc: loc,
) -> list[str]:
    """One ``path: message`` line per problem in ``exc``, in the order pydantic found them."""
    lines: list[str] = []
    for err in exc.errors():
        loc, parent = _walk(root, tuple(err["loc"]))
        if err["type"] == PROBLEMS_ERROR_TYPE:
            for sub_loc, message in (err.get("ctx") or {}).get("problems", ()):
                lines.append(f"{format_path(remap(loc + tuple(sub_loc)))}: {message}")
            continue
        if err["type"] == "union_tag_invalid" and isinstance(err.get("input"), dict):
            loc = (*loc, "type")  # our only tagged-by-value unions switch on `type`
        key = loc[-1] if loc else None
        lines.append(f"{format_path(remap(loc))}: {_message(err, parent, key)}")
    return list(dict.fromkeys(lines))  # a union can report one problem twice
