"""Users and tokens (accounts): issue, authenticate, expire, revoke, disable."""

from __future__ import annotations

import hashlib
import hmac
import pathlib

import pytest
from gpujobq.controller import accounts, database, errors

NOW = 1_800_000_000.0


@pytest.fixture
def db(tmp_path: pathlib.Path) -> database.sqlite_utils.Database:
    db = database.open_database(tmp_path / "t.db")
    accounts.add_user(db, "alice", NOW)
    accounts.add_user(db, "bob", NOW)
    return db


def test_issue_and_authenticate(db: database.sqlite_utils.Database) -> None:
    token = accounts.issue_token(db, "alice", NOW, days=1)
    assert accounts.authenticate(db, token, NOW + 10) == "alice"
    assert accounts.authenticate(db, token, NOW + 86400) is None  # expired
    assert accounts.token_id(db, token) == token[4:16]


def test_several_tokens_and_revocation(db: database.sqlite_utils.Database) -> None:
    a = accounts.issue_token(db, "alice", NOW, days=1)
    b = accounts.issue_token(db, "alice", NOW, days=1)
    assert accounts.revoke_token(db, token_id(db, a), NOW)
    assert not accounts.revoke_token(db, token_id(db, a), NOW)  # once
    assert (accounts.authenticate(db, a, NOW), accounts.authenticate(db, b, NOW)) == \
        (None, "alice")


def token_id(db: database.sqlite_utils.Database, token: str) -> str:
    found = accounts.token_id(db, token)
    assert found is not None
    return found


def test_disable_refuses_every_token_and_enable_gives_them_back(
        db: database.sqlite_utils.Database) -> None:
    token = accounts.issue_token(db, "alice", NOW, days=1)
    accounts.set_disabled(db, "alice", NOW)
    assert accounts.authenticate(db, token, NOW) is None
    users = {u.id: u for u in accounts.list_users(db, NOW)}
    assert users["alice"].disabled_at == NOW and users["bob"].disabled_at is None
    accounts.set_disabled(db, "alice", None)
    assert accounts.authenticate(db, token, NOW) == "alice"
    with pytest.raises(errors.NotFound):
        accounts.set_disabled(db, "carol", NOW)


def test_another_users_id_with_my_secret_is_refused(db: database.sqlite_utils.Database) -> None:
    mine = accounts.issue_token(db, "alice", NOW, days=1)
    theirs = accounts.issue_token(db, "bob", NOW, days=1)
    assert accounts.authenticate(db, theirs[:17] + mine[17:], NOW) is None


def test_tokens_from_before_ids_still_work(db: database.sqlite_utils.Database) -> None:
    legacy = "gjq_" + "x" * 43
    db.execute("INSERT INTO tokens (id, user_id, hash, created_at, expires_at)"
               " VALUES ('0123456789ab', 'bob', ?, ?, ?)",
               [hashlib.sha256(legacy.encode()).hexdigest(), NOW, NOW + 60])
    assert accounts.authenticate(db, legacy, NOW) == "bob"
    accounts.set_disabled(db, "bob", NOW)
    assert accounts.authenticate(db, legacy, NOW) is None


def test_digests_are_compared_in_constant_time_found_or_not(
        db: database.sqlite_utils.Database, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(accounts.hmac, "compare_digest", spy)
    token = accounts.issue_token(db, "alice", NOW, days=1)
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    for attempt, user in [(token, "alice"), (wrong, None), ("gjq_ffffffffffff_" + "a" * 43, None),
                          ("junk", None)]:
        assert accounts.authenticate(db, attempt, NOW) == user
    assert len(calls) == 4  # every attempt, found or not, goes through compare_digest


@pytest.mark.parametrize("days", [0, -1, float("inf"), float("nan")])
def test_a_token_lifetime_must_be_positive_and_finite(db: database.sqlite_utils.Database,
                                                      days: float) -> None:
    with pytest.raises(errors.BadRequest):
        accounts.issue_token(db, "alice", NOW, days=days)


def test_bad_user_names_are_refused(db: database.sqlite_utils.Database) -> None:
    for name in ("../x", "", "a b", "x" * 65):
        with pytest.raises(errors.BadRequest):
            accounts.add_user(db, name, NOW)


def test_log_records_never_carry_a_token(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    token = "gjq_0123456789ab_" + "S" * 43
    handler = logging.StreamHandler()
    logger = logging.getLogger("gpujobq.test.redact")
    logger.addHandler(handler)
    try:
        accounts.redact_logs("gpujobq.test.redact")
        accounts.redact_logs("gpujobq.test.redact")  # once is enough; twice changes nothing
        assert sum(isinstance(f, accounts.RedactTokens) for f in handler.filters) == 1
        record = logging.LogRecord("x", logging.INFO, __file__, 1, '%s "GET %s" %d',
                                   ("127.0.0.1", f"/api/jobs?token={token}", 200), None)
        assert handler.filters[0].filter(record)
        assert record.getMessage() == '127.0.0.1 "GET /api/jobs?token=gjq_[redacted]" 200'
    finally:
        logger.removeHandler(handler)


def test_kept_tokens_forget_what_another_connection_changes(tmp_path: pathlib.Path) -> None:
    """The controller keeps the tokens it accepted; the admin commands write the database
    from another process, and the very next request sees what they changed."""
    served = database.open_database(tmp_path / "t.db")
    admin = database.open_database(tmp_path / "t.db")  # another connection: the CLI's
    accounts.add_user(admin, "bob", NOW)
    token = accounts.issue_token(admin, "bob", NOW, days=1)
    auth = accounts.Authenticator(served)
    assert auth(token, NOW) == "bob"
    assert auth(token, NOW + 86400) is None  # a kept token still expires on time
    assert auth("gjq_" + "0" * 12 + "_" + "x" * 43, NOW) is None
    accounts.revoke_token(admin, accounts.token_id(admin, token) or "", NOW)
    assert auth(token, NOW) is None  # revoked elsewhere: refused at once
    token = accounts.issue_token(admin, "bob", NOW, days=1)
    assert auth(token, NOW) == "bob"
    accounts.set_disabled(admin, "bob", NOW)
    assert auth(token, NOW) is None  # disabled elsewhere: refused at once
    accounts.set_disabled(admin, "bob", None)
    assert auth(token, NOW) == "bob"


def test_kept_tokens_are_what_is_used(tmp_path: pathlib.Path) -> None:
    served = database.open_database(tmp_path / "t.db")
    accounts.add_user(served, "bob", NOW)
    token = accounts.issue_token(served, "bob", NOW, days=1)
    auth = accounts.Authenticator(served)
    assert auth(token, NOW) == "bob"
    served.execute("DELETE FROM tokens")  # on its own connection: no version change
    assert auth(token, NOW) == "bob"  # answered from memory, no query
    assert accounts.authenticate(served, token, NOW) is None


async def test_in_the_event_loop_a_change_is_seen_from_the_next_turn(
        tmp_path: pathlib.Path) -> None:
    import asyncio

    served = database.open_database(tmp_path / "t.db")
    admin = database.open_database(tmp_path / "t.db")
    accounts.add_user(admin, "bob", NOW)
    token = accounts.issue_token(admin, "bob", NOW, days=1)
    auth = accounts.Authenticator(served)
    assert auth(token, NOW) == "bob"
    accounts.set_disabled(admin, "bob", NOW)
    assert auth(token, NOW) == "bob"  # the same turn: requests that arrived together
    await asyncio.sleep(0)
    assert auth(token, NOW) is None  # the next turn sees the admin's change
