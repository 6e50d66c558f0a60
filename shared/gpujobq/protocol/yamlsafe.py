"""YAML for files people write: safe types only, no aliases, no duplicate keys, size-capped."""

from __future__ import annotations

import re
from typing import Any

import yaml


class YAMLError(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (billion laughs), explicit tags
    (``!!python/object``, ``!!binary``, ``!custom``: plain data needs none) and duplicate
    keys (silent overrides). Each is refused at the first event that carries it, before
    anything is built."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        problem = None
        if isinstance(event, yaml.AliasEvent):
            problem = "aliases are not allowed"
        elif getattr(event, "anchor", None) is not None:
            problem = "anchors are not allowed"
        elif getattr(event, "tag", None) is not None:
            problem = "tags are not allowed"
        if problem:
            raise yaml.constructor.ConstructorError(None, None, problem, event.start_mark)
        return super().compose_node(parent, index)

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


# YAML 1.1 reads a float only with a dot ("1e3" stays a string); JSON and YAML 1.2 do not.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


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
    mark = exc.problem_mark or exc.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return ": ".join(parts) + where
