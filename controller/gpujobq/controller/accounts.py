"""Users and their bearer tokens.

A token is ``gjq_<id>_<secret>``: a public 12-hex-digit id (for listing and revoking)
and 32 random bytes. Only the SHA-256 of the whole token is stored (a slow password
hash would cost every request and buys nothing for random secrets). A request is
authenticated by looking the id up and comparing digests in constant time, so how
long a refusal takes says nothing about how much of a guess was right.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets

import msgspec
import sqlite_utils
from gpujobq.controller import database, errors
from gpujobq.protocol import jobconfig

TOKEN_PREFIX = "gjq_"
_TOKEN = re.compile(r"gjq_([0-9a-f]{12})_[A-Za-z0-9_-]{43}\Z")
_TOKEN_TEXT = re.compile(r"gjq_[A-Za-z0-9_-]{8,}")  # anything shaped like one, in free text


class RedactTokens(logging.Filter):
    """Masks anything shaped like a token in a log record, whatever logged it (a path or
    query string in an access log, an error detail): tokens never reach the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if TOKEN_PREFIX in message:
            record.msg, record.args = _TOKEN_TEXT.sub("gjq_[redacted]", message), None
        return True


def redact_logs(*loggers: str) -> None:
    """Install RedactTokens on every handler of the root logger and of ``loggers``."""
    for name in ("", *loggers):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactTokens) for f in handler.filters):
                handler.addFilter(RedactTokens())


class UserInfo(msgspec.Struct, frozen=True):
    id: str
    created_at: float
    admin: bool
    disabled_at: float | None
    active_tokens: int


class TokenInfo(msgspec.Struct, frozen=True):
    id: str
    user_id: str
    created_at: float
    expires_at: float
    revoked_at: float | None


_NOTHING = "0" * 64


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_user(db: sqlite_utils.Database, user_id: str, now: float, *, admin: bool = False) -> bool:
    """Create a user; False when it exists already (``admin=True`` then makes it an admin)."""
    if not jobconfig.valid_id(user_id):
        raise errors.BadRequest(
            f"user id {user_id!r} must be 1-64 letters, digits, '.', '_' or '-'"
        )
    with database.write(db):
        cur = db.execute(
            "INSERT INTO users (id, created_at, admin) VALUES (?, ?, ?)"
            " ON CONFLICT(id) DO NOTHING",
            [user_id, now, int(admin)],
        )
        if admin:
            db.execute("UPDATE users SET admin = 1 WHERE id = ?", [user_id])
        return cur.rowcount == 1


def is_admin(db: sqlite_utils.Database, user_id: str) -> bool:
    row = db.execute("SELECT admin FROM users WHERE id = ?", [user_id]).fetchone()
    return bool(row and row[0])


def set_disabled(db: sqlite_utils.Database, user_id: str, now: float | None) -> None:
    """Disable a user (``now``: none of its tokens is accepted from then on) or enable it
    again (None); its tokens are kept, so enabling gives back the same access."""
    with database.write(db):
        cur = db.execute("UPDATE users SET disabled_at = ? WHERE id = ?", [now, user_id])
        if cur.rowcount != 1:
            raise errors.NotFound(f"no user {user_id!r}")


def list_users(db: sqlite_utils.Database, now: float) -> list[UserInfo]:
    rows = db.execute(
        "SELECT u.id, u.created_at, u.admin, u.disabled_at, (SELECT COUNT(*) FROM tokens t"
        " WHERE t.user_id = u.id AND t.revoked_at IS NULL AND t.expires_at > ?)"
        " FROM users u ORDER BY u.id", [now])
    return [UserInfo(r[0], r[1], bool(r[2]), r[3], r[4]) for r in rows]


def issue_token(db: sqlite_utils.Database, user_id: str, now: float, days: float) -> str:
    """A new token for an existing user; the plain token is returned once, never stored."""
    if not days > 0 or days == float("inf"):
        raise errors.BadRequest(f"a token lifetime must be a positive number of days, not {days}")
    with database.write(db):
        if not db.execute("SELECT 1 FROM users WHERE id = ?", [user_id]).fetchone():
            raise errors.NotFound(f"no user {user_id!r}")
        while True:
            public = secrets.token_hex(6)
            if not db.execute("SELECT 1 FROM tokens WHERE id = ?", [public]).fetchone():
                break
        token = f"{TOKEN_PREFIX}{public}_{secrets.token_urlsafe(32)}"
        db.execute(
            "INSERT INTO tokens (id, user_id, hash, created_at, expires_at) VALUES (?,?,?,?,?)",
            [public, user_id, _digest(token), now, now + days * 86400],
        )
    return token


def authenticate(db: sqlite_utils.Database, token: str, now: float) -> str | None:
    """The user a valid, unexpired, unrevoked token of an enabled user belongs to."""
    found = _lookup(db, token, _digest(token), now)
    return None if found is None else found[0]


def _lookup(db: sqlite_utils.Database, token: str, digest: str, now: float
            ) -> tuple[str, float] | None:
    """(user, expires_at) of a valid token (``digest``: its SHA-256), or None."""
    match = _TOKEN.match(token)
    if match:
        row = db.execute(
            "SELECT t.user_id, t.hash, t.expires_at FROM tokens t"
            " JOIN users u ON u.id = t.user_id WHERE t.id = ? AND t.revoked_at IS NULL"
            " AND t.expires_at > ? AND u.disabled_at IS NULL", [match[1], now],
        ).fetchone()
    else:
        # Tokens issued before ids were part of them (``gjq_`` + 43 characters): found
        # by digest, which does not depend on how much of a guess matches either.
        row = db.execute(
            "SELECT t.user_id, t.hash, t.expires_at FROM tokens t"
            " JOIN users u ON u.id = t.user_id WHERE t.hash = ? AND t.revoked_at IS NULL"
            " AND t.expires_at > ? AND u.disabled_at IS NULL", [digest, now],
        ).fetchone()
    # Compared even when nothing was found, so both refusals take the same path.
    same = hmac.compare_digest(row[1] if row else _NOTHING, digest)
    return (str(row[0]), float(row[2])) if row is not None and same else None


class Authenticator:
    """authenticate() with the tokens it accepted kept in memory, so a request costs a
    digest and a dict lookup instead of a query.

    Users and tokens change only through the admin commands, which write the database
    from another process: any write by another connection bumps SQLite's
    ``PRAGMA data_version`` (read once per turn of the event loop), and the cache is
    emptied before it is used again. A revoked token or a disabled user is refused from
    the next turn on.
    A kept token still expires on time; refusals are never kept.
    """

    MAX = 100_000  # tokens kept; past it the cache starts over

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db
        self._valid: dict[str, tuple[str, float]] = {}  # digest -> (user, expires_at)
        self._version: int | None = None
        self._looked = False  # data_version read in this turn of the event loop

    def __call__(self, token: str, now: float) -> str | None:
        if not self._looked:
            # Once per turn of the event loop: the requests of one turn arrived together,
            # and another process's write is seen from the next turn on.
            version = self.db.conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:
                self._valid.clear()
                self._version = version
            with contextlib.suppress(RuntimeError):  # no loop (a script): look every time
                asyncio.get_running_loop().call_soon(self._new_turn)
                self._looked = True
        digest = _digest(token)
        kept = self._valid.get(digest)
        if kept is not None and now < kept[1]:
            return kept[0]
        found = _lookup(self.db, token, digest, now)
        if found is None:
            return None
        if len(self._valid) >= self.MAX:
            self._valid.clear()
        self._valid[digest] = found
        return found[0]


    def _new_turn(self) -> None:
        self._looked = False


def token_id(db: sqlite_utils.Database, token: str) -> str | None:
    row = db.execute("SELECT id FROM tokens WHERE hash = ?", [_digest(token)]).fetchone()
    return row[0] if row else None


def list_tokens(db: sqlite_utils.Database, user_id: str | None = None) -> list[TokenInfo]:
    sql = "SELECT id, user_id, created_at, expires_at, revoked_at FROM tokens"
    args: list[str] = []
    if user_id is not None:
        sql += " WHERE user_id = ?"
        args.append(user_id)
    return [TokenInfo(*row) for row in db.execute(sql + " ORDER BY created_at", args)]


def revoke_token(db: sqlite_utils.Database, token_id: str, now: float) -> bool:
    with database.write(db):
        cur = db.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", [now, token_id]
        )
        return cur.rowcount == 1
