"""Users and their bearer tokens.

Tokens are 32 random bytes; only their SHA-256 is stored (a slow password hash would
cost every request and buys nothing for random secrets).
"""

from __future__ import annotations

import hashlib
import secrets

import msgspec
import sqlite_utils
from gpujobq.controller import database, errors
from gpujobq.protocol import jobconfig

TOKEN_PREFIX = "gjq_"


class TokenInfo(msgspec.Struct, frozen=True):
    id: str
    user_id: str
    created_at: float
    expires_at: float
    revoked_at: float | None


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


def issue_token(db: sqlite_utils.Database, user_id: str, now: float, days: float) -> str:
    """A new token for an existing user; the plain token is returned once, never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with database.write(db):
        if not db.execute("SELECT 1 FROM users WHERE id = ?", [user_id]).fetchone():
            raise errors.NotFound(f"no user {user_id!r}")
        db.execute(
            "INSERT INTO tokens (id, user_id, hash, created_at, expires_at) VALUES (?,?,?,?,?)",
            [secrets.token_hex(6), user_id, _digest(token), now, now + days * 86400],
        )
    return token


def authenticate(db: sqlite_utils.Database, token: str, now: float) -> str | None:
    """The user a valid, unexpired, unrevoked token belongs to."""
    row = db.execute(
        "SELECT user_id FROM tokens WHERE hash = ? AND revoked_at IS NULL AND expires_at > ?",
        [_digest(token), now],
    ).fetchone()
    return row[0] if row else None


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
