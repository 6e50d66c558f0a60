"""Where the `gpujobq` CLI finds its server and token: the environment, then a config file.

``GPUJOBQ_SERVER`` and ``GPUJOBQ_TOKEN`` win; what they leave out comes from the config
file: ``GPUJOBQ_CONFIG`` (or ``--config``) where set, else
``$XDG_CONFIG_HOME/gpujobq/config.yaml`` (``~/.config/gpujobq/config.yaml``)::

    server: http://gpu-queue.example.org:8001
    token: gjq_...

Tokens never come from the command line: arguments are visible to every user of the
machine (``ps``) and end up in shell history. A config file holding a token that group or
others may read draws a warning, as ssh warns about private keys.
"""

from __future__ import annotations

import pathlib
import stat
import urllib.parse
from collections.abc import Callable, Mapping

import msgspec
from gpujobq.protocol import yamlsafe

ENV_SERVER = "GPUJOBQ_SERVER"
ENV_TOKEN = "GPUJOBQ_TOKEN"
ENV_CONFIG = "GPUJOBQ_CONFIG"


class ConfigError(Exception):
    """The server or token is missing or unusable; the message says what to do."""


class FileConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The config file: strict, so a typo ("sever:") fails with its name."""

    server: str | None = None
    token: str | None = None


class Settings(msgspec.Struct, frozen=True):
    server: str  # base URL, e.g. "http://127.0.0.1:8001" (no trailing slash)
    token: str
    token_from: str  # where the token came from, for error messages


def default_path(env: Mapping[str, str]) -> pathlib.Path:
    base = env.get("XDG_CONFIG_HOME") or str(pathlib.Path(env.get("HOME", "~")) / ".config")
    return pathlib.Path(base).expanduser() / "gpujobq" / "config.yaml"


def load(env: Mapping[str, str], path: pathlib.Path | None = None,
         warn: Callable[[str], None] = lambda _: None) -> Settings:
    """The settings from ``env`` and the config file (``path``, else the env's or default)."""
    named = path or (pathlib.Path(env[ENV_CONFIG]).expanduser() if env.get(ENV_CONFIG) else None)
    file_path = named or default_path(env)
    server, token = env.get(ENV_SERVER) or None, env.get(ENV_TOKEN) or None
    found = FileConfig()
    if named is not None or not (server and token):
        found = read_file(file_path, required=named is not None, warn=warn)
    server = server or found.server
    token = token or found.token
    if not server or not token:
        missing = " and ".join(n for n, v in (("server", server), ("token", token)) if not v)
        raise ConfigError(
            f"no {missing} configured: set {ENV_SERVER} and {ENV_TOKEN}, or write "
            f"'server:' and 'token:' to {file_path} (chmod 600)")
    token_from = f"${ENV_TOKEN}" if env.get(ENV_TOKEN) else str(file_path)
    return Settings(server=base_url(server), token=check_token(token, token_from),
                    token_from=token_from)


def read_file(path: pathlib.Path, *, required: bool,
              warn: Callable[[str], None] = lambda _: None) -> FileConfig:
    """The config file's fields; an absent file is empty unless ``required``."""
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        if required:
            raise ConfigError(f"config file {path} does not exist") from exc
        return FileConfig()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yamlsafe.load(raw)
        found = msgspec.convert({} if data is None else data, FileConfig, strict=True)
    except (yamlsafe.YAMLError, msgspec.ValidationError) as exc:
        raise ConfigError(f"config file {path}: {_readable(exc)}") from exc
    if found.token and mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(f"warning: {path} holds a token and is readable by others "
             f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
    return found


def base_url(server: str) -> str:
    """``server`` as a base URL: "host:8001" means http://host:8001."""
    text = server.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"server {server!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ConfigError(f"server {server!r}: give the base URL only, e.g. http://host:8001")
    return text.rstrip("/")


def check_token(token: str, where: str) -> str:
    token = token.strip()
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"the token in {where} holds spaces or characters a header "
                          "cannot carry")
    return token


def _readable(exc: Exception) -> str:
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc).replace("`$.", "`").replace("`$`", "the document")
        return text.replace("Object contains unknown field", "unknown field")
    return f"not valid YAML: {exc}"
