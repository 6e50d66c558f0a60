"""config.yaml: what a user sends with solution.py.

Decoded strictly: an unknown field, a wrong type or a missing field is an error that
names the field. The guide's Python example sends ``str(dict)``, which parses as a YAML
flow mapping, and JSON parses as YAML too, so one loader takes all three forms.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any

import msgspec
from gpujobq.protocol import yamlsafe

# Letters, digits, '.', '_' and '-'; starts with a letter or digit. IDs become parts of
# file names (results/{user}_{competition}_{ts}.jsonl), so nothing else may pass.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"  # \Z: "$" would allow a final newline
Ident = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
MAX_EXPECTED_TIME = 30 * 24 * 3600.0

_id_re = re.compile(ID_PATTERN)


class JobConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    competition_id: Ident
    project_id: Ident
    user_id: Ident
    expected_time: Annotated[float, msgspec.Meta(gt=0, le=MAX_EXPECTED_TIME)]
    token: str | None = None
    # GPUs this job needs on one host; left out, its competition's default (usually 1).
    gpus: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None


class ConfigError(ValueError):
    """config.yaml is unreadable (``malformed``) or does not fit the schema."""

    def __init__(self, message: str, *, malformed: bool) -> None:
        super().__init__(message)
        self.malformed = malformed


def valid_id(value: str) -> bool:
    return bool(_id_re.match(value))


def parse(raw: bytes) -> JobConfig:
    try:
        data = yamlsafe.load(raw)
    except yamlsafe.YAMLError as exc:
        raise ConfigError(f"config.yaml is not valid YAML: {exc}", malformed=True) from exc
    if not isinstance(data, dict):
        raise ConfigError("config.yaml must be a mapping of fields", malformed=True)
    try:
        return msgspec.convert(data, JobConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config.yaml: {_readable(str(exc))}", malformed=False) from exc


def for_job(config: JobConfig) -> bytes:
    """config.yaml as the job sees it: the fields it sent, never the token. A user sends
    the same config.yaml submission after submission, so the text is kept per config
    (not for one holding a token: no token stays in memory)."""
    return _render(config) if config.token is not None else _kept(config)


@functools.lru_cache(maxsize=4096)
def _kept(config: JobConfig) -> bytes:
    return _render(config)


def _render(config: JobConfig) -> bytes:
    fields: dict[str, Any] = msgspec.structs.asdict(config)
    fields.pop("token", None)
    if fields["gpus"] is None:
        del fields["gpus"]
    return yamlsafe.dump_flat(fields).encode()


def _readable(message: str) -> str:
    # msgspec says "... - at `$.expected_time`"; users wrote "expected_time".
    return message.replace("`$.", "`").replace("`$`", "the document")
