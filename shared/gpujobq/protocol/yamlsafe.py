"""YAML for files people write: safe types only, no aliases, no duplicate keys, size-capped."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml


class YAMLError(ValueError):
    pass


# libyaml (C) parses ~10x faster than PyYAML's pure-Python parser; both are checked the
# same way. Where PyYAML was built without it, the pure-Python classes are used.
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
MAX_DEPTH = 64  # nesting of flow or block collections; deeper is refused before building


class _StrictLoader(_Base):  # type: ignore[misc,valid-type]
    """SafeLoader that refuses duplicate keys (silent overrides). Anchors, aliases and
    tags are refused by ``_check`` on the event stream, before anything is built."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                duplicate = False
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, "duplicate key", key_node.start_mark
                )
            seen.add(key) if isinstance(key, str | int | float | bool) else None
        return super().construct_mapping(node, deep=deep)


def _check(text: str) -> None:
    """Refuse anchors and aliases (billion laughs), explicit tags (``!!python/object``,
    ``!!binary``, ``!custom``: plain data needs none) and deep nesting, each at the first
    event that carries it."""
    depth = 0
    for event in yaml.parse(text, Loader=_Base):
        problem = None
        if isinstance(event, yaml.AliasEvent):
            problem = "aliases are not allowed"
        elif getattr(event, "anchor", None) is not None:
            problem = "anchors are not allowed"
        elif getattr(event, "tag", None) is not None:
            problem = "tags are not allowed"
        elif isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                problem = f"nested too deeply (more than {MAX_DEPTH} levels)"
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if problem:
            raise yaml.constructor.ConstructorError(None, None, problem, event.start_mark)


def _may_hide(text: str) -> bool:
    """Whether the text could hold what _check refuses: anchors (&), aliases (*), tags
    (!) or deep nesting (flow brackets, or block nesting, which needs a line or a "- "
    per level). Most config files hold none, and skip the event pass."""
    return ("&" in text or "*" in text or "!" in text
            or text.count("[") + text.count("{") > MAX_DEPTH
            or text.count("\n") > MAX_DEPTH or text.count("- ") > MAX_DEPTH)  # block nesting


def dump(data: Any) -> str:
    """Plain data as block YAML, keys in the order given."""
    return str(yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=False))


_STR = "tag:yaml.org,2002:str"
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def dump_flat(fields: dict[str, str | int | float | bool | None]) -> str:
    """A flat mapping of scalars as block YAML, as ``dump`` writes it but ~50x cheaper:
    a string stays plain where YAML (PyYAML's and ours) reads it back as that string,
    and is double-quoted
    (JSON escapes are YAML's) where it would read as something else ("123", "yes")."""
    lines = []
    for key, value in fields.items():
        if isinstance(value, str):
            plain = _PLAIN.match(value) and _resolver.resolve(
                yaml.ScalarNode, value, (True, False)) == _STR
            text = value if plain else json.dumps(value)
        elif isinstance(value, bool) or value is None:
            text = json.dumps(value)
        elif isinstance(value, float):
            text = repr(value).lower()  # as PyYAML's representer: 1e-05 -> 1.0e-05
            if "." not in text and "e" in text:
                text = text.replace("e", ".0e", 1)
        else:
            text = str(int(value))
        lines.append(f"{key}: {text}\n")
    return "".join(lines)


class _Resolver(yaml.resolver.Resolver):
    """How _StrictLoader reads plain scalars, for dump_flat to check against."""


# YAML 1.1 reads a float only with a dot ("1e3" stays a string); JSON and YAML 1.2 do not.
for _cls in (_StrictLoader, _Resolver):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
_resolver = _Resolver()


def load(text: bytes | str, *, max_bytes: int = 64 << 10) -> Any:
    """Parse one YAML document (JSON and Python dict reprs parse as flow mappings)."""
    if len(text) > max_bytes:
        raise YAMLError(f"larger than {max_bytes} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise YAMLError("not valid UTF-8") from exc
    try:
        if _may_hide(text):
            _check(text)
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise YAMLError(_describe(exc)) from exc
    except RecursionError as exc:  # "[[[[..." nests deeper than the parser can follow
        raise YAMLError("nested too deeply") from exc


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _unquote(found: re.Match[str]) -> str:
    text = found[0]
    # Kept: PyYAML's token names ('<scalar>') and punctuation (expected ',' or '}').
    return text if re.fullmatch(r"'<[a-z ]+>'|'[^\w\s]{1,3}'", text) else "(input)"


def _describe(exc: yaml.YAMLError) -> str:
    """The problem and where, never the text around it: a config.yaml line may hold a
    token, and error details reach logs."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())
    # PyYAML quotes bits of the input in some problems ("found undefined tag handle
    # '!x!'"); those bits are dropped, its own token names ('<scalar>') kept.
    parts = [_QUOTED.sub(_unquote, p) for p in (exc.context, exc.problem) if p]
    if "maximum nesting depth" in (exc.problem or ""):  # libyaml's own limit (1000)
        parts = ["nested too deeply"]
    mark = exc.problem_mark or exc.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return ": ".join(parts) + where
