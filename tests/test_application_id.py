"""``PRAGMA application_id``: sessiondb stamps its stores (new ones when created, older
ones and converted hermes-agent files at their first open, through the write path), and
refuses another application's SQLite file without touching it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import apsw
import pytest

from sessiondb import DatabaseOpenError, ForeignDatabaseError, SessionDB, doctor, schema
from sessiondb.cli import main as cli_main
from sessiondb.schema import APPLICATION_ID, SCHEMA_VERSION
from test_compat_hermes_file import build_hermes_db


def app_id(path: Path) -> int:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return int(conn.pragma("application_id"))
    finally:
        conn.close()


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


def test_the_value():
    assert APPLICATION_ID == 0x53734442 == int.from_bytes(b"SsDB", "big")
    assert 0 < APPLICATION_ID < 2**31  # PRAGMA application_id is a signed 32-bit integer


def test_a_new_store_is_stamped(tmp_path: Path):
    path = tmp_path / "state.db"
    SessionDB(path).close()
    assert app_id(path) == APPLICATION_ID


@pytest.mark.parametrize("version", [1, SCHEMA_VERSION])
def test_an_older_store_is_stamped_at_its_first_open(tmp_path: Path, version: int):
    """Stores made before sessiondb stamped them have 0: stamped through the write
    path, as one more write transaction (after the migrations, if any)."""
    path = tmp_path / "old.db"
    if version == 1:  # as sessiondb 0.1.0 made it
        conn = apsw.Connection(str(path))
        conn.pragma("journal_mode", "wal")
        conn.execute(schema.MIGRATIONS[0])
        conn.pragma("user_version", 1)
    else:
        SessionDB(path).close()
        conn = apsw.Connection(str(path))
        conn.pragma("application_id", 0)
    conn.close()
    assert app_id(path) == 0
    with SessionDB(path) as db:
        writes = db.stats()["writes"]
        assert writes >= 1  # the stamp went through the write path
        assert db._engine._conn.pragma("application_id") == APPLICATION_ID
    assert app_id(path) == APPLICATION_ID


def test_a_converted_hermes_agent_file_is_stamped(tmp_path: Path):
    path = tmp_path / "hermes-state.db"
    build_hermes_db(path)
    assert app_id(path) == 0
    with SessionDB(path) as db:
        assert db.session_count() > 0
    assert app_id(path) == APPLICATION_ID


@pytest.mark.parametrize("foreign, shown", [
    (0x47504B47, "0x47504b47 ('GPKG')"),        # a GeoPackage
    (0x0F055112, "0x0f055112"),                 # a Fossil repository
    (-2, "0xfffffffe"),                         # negative: the id is signed
])
def test_another_applications_database_is_refused_untouched(tmp_path: Path, foreign: int,
                                                            shown: str):
    path = tmp_path / "other.db"
    conn = apsw.Connection(str(path))
    conn.pragma("application_id", foreign)
    conn.execute("CREATE TABLE features (id INTEGER PRIMARY KEY)")
    conn.close()
    before = fingerprint(path)
    with pytest.raises(ForeignDatabaseError) as caught:
        SessionDB(path)
    err = caught.value
    assert isinstance(err, DatabaseOpenError)
    assert (err.path, err.application_id) == (str(path), foreign)
    assert shown in str(err) and "nothing was changed" in str(err)
    assert fingerprint(path) == before
    assert sorted(os.listdir(tmp_path)) == ["other.db"]
    report = doctor.check(path)
    assert not report["ok"] and report["application_id"] == foreign
    assert shown in report["problems"][0]
    assert fingerprint(path) == before


def test_a_sessiondb_schema_under_another_id_is_refused_too(tmp_path: Path):
    """The id decides, whatever the tables look like: an application that copied
    sessiondb's schema, or a file another tool stamped."""
    path = tmp_path / "state.db"
    SessionDB(path).close()
    conn = apsw.Connection(str(path))
    conn.pragma("application_id", 0x12345678)
    conn.close()
    before = fingerprint(path)
    with pytest.raises(ForeignDatabaseError):
        SessionDB(path)
    assert fingerprint(path) == before


def test_doctor_shows_the_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "state.db"
    SessionDB(path).close()
    assert doctor.check(path)["application_id"] == APPLICATION_ID
    assert cli_main(["doctor", "--db", str(path)]) == 0
    assert "application id   0x53734442" in capsys.readouterr().out


def test_refusal_reads_the_id_with_the_schema(tmp_path: Path):
    """refuse_unusable reads the id, the version and the tables in one statement, so
    from one snapshot, before anything writes."""
    path = tmp_path / "x.db"
    conn = apsw.Connection(str(path))
    conn.pragma("application_id", 7)
    with pytest.raises(ForeignDatabaseError):
        schema.refuse_unusable(conn, path)
    conn.close()
