"""Titles: sanitizing, uniqueness, clearing, and the "name #N" lineage helpers."""

from __future__ import annotations

import pytest

from sessiondb import (
    InvalidArgument, InvalidArgumentType, InvalidTitle, SessionDB, TitleConflict,
    sanitize_title,
)

STRIPPED = (
    [chr(c) for c in range(0x00, 0x09)] + ["\x0b", "\x0c"]
    + [chr(c) for c in range(0x0E, 0x20)] + ["\x7f"]
    + [chr(c) for c in range(0x200B, 0x2010)]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + ["\u2028", "\u2029"]
    + [chr(c) for c in range(0x2060, 0x206A)]
    + ["\ufeff"]
)


# -- sanitize_title --------------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [
    ("  hello  ", "hello"),
    ("a   b", "a b"),
    ("a \t\n\r b", "a b"),
    ("\tlead and trail\n", "lead and trail"),
    ("a\u00a0\u00a0b", "a b"),          # NBSP is whitespace: collapsed, not deleted
    ("a\u3000b", "a b"),
    ("Mixed CASE kept", "Mixed CASE kept"),
    ("Ünïcödé 日本語 🎉", "Ünïcödé 日本語 🎉"),
    ("a #2", "a #2"),
    ("\u200bhello\u200b", "hello"),
    ("a \u200b b", "a b"),              # deleting leaves a whitespace run, then collapsed
])
def test_sanitize_rules(raw: str, clean: str) -> None:
    assert sanitize_title(raw) == clean


@pytest.mark.parametrize("char", STRIPPED, ids=[f"U+{ord(c):04X}" for c in STRIPPED])
def test_sanitize_deletes_invisible_character(char: str) -> None:
    assert sanitize_title(f"a{char}b") == "ab"
    assert sanitize_title(f"{char}title{char}") == "title"
    assert sanitize_title(char) is None


@pytest.mark.parametrize("raw", [None, "", " ", "\t\n ", "\u200b\u200c\ufeff", "\x00 \x7f"])
def test_sanitize_empty_becomes_none(raw) -> None:
    assert sanitize_title(raw) is None


def test_sanitize_length_limit() -> None:
    assert sanitize_title("x" * 100) == "x" * 100
    # The limit applies after cleaning.
    assert sanitize_title("  " + "x" * 50 + "\u200b" * 10 + "x" * 50 + "  ") == "x" * 100
    with pytest.raises(InvalidTitle) as info:
        sanitize_title("x" * 101)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, InvalidArgument)
    assert "101" in str(info.value)


@pytest.mark.parametrize("bad", [0, 123, False, [], ["t"], b"bytes"])
def test_sanitize_non_str_is_a_type_error(bad) -> None:
    with pytest.raises(InvalidArgumentType):
        sanitize_title(bad)


def test_sanitize_lone_surrogate_refused() -> None:
    with pytest.raises(InvalidArgument):
        sanitize_title("bad \ud800 title")


# -- storing titles ----------------------------------------------------------------------

def test_set_and_get_title(db: SessionDB) -> None:
    db.create_session("s1", "cli")
    assert db.set_session_title("s1", "  My\u200b   Project\n") is True
    assert db.get_session_title("s1") == "My Project"
    assert db.get_session("s1")["title"] == "My Project"
    assert db.get_session_by_title("My Project")["id"] == "s1"
    assert db.get_session_by_title("my project") is None
    assert db.get_session_title("missing") is None
    assert db.get_session_by_title("nothing") is None


def test_set_title_on_missing_session_is_false(db: SessionDB) -> None:
    assert db.set_session_title("ghost", "T") is False
    assert db.get_session_by_title("T") is None


def test_set_same_title_again_on_same_session(db: SessionDB) -> None:
    db.create_session("s1", "cli")
    db.set_session_title("s1", "T")
    assert db.set_session_title("s1", " T ") is True
    assert db.get_session_title("s1") == "T"


def test_too_long_title_refused_and_unchanged(db: SessionDB) -> None:
    db.create_session("s1", "cli", title="short")
    with pytest.raises(InvalidTitle):
        db.set_session_title("s1", "y" * 101)
    assert db.get_session_title("s1") == "short"
    with pytest.raises(InvalidTitle):
        db.create_session("s2", "cli", title="y" * 101)
    assert db.get_session("s2") is None


def test_title_conflict(db: SessionDB) -> None:
    db.create_session("s1", "cli", title="Shared")
    db.create_session("s2", "cli")
    with pytest.raises(TitleConflict) as info:
        db.set_session_title("s2", "  Shared ")
    assert isinstance(info.value, ValueError)
    assert info.value.title == "Shared"
    assert info.value.session_id == "s1"
    assert db.get_session_title("s2") is None
    with pytest.raises(TitleConflict):
        db.create_session("s3", "cli", title="Shared")
    assert db.get_session("s3") is None


def test_titles_are_case_sensitive(db: SessionDB) -> None:
    db.create_session("s1", "cli", title="Deploy")
    db.create_session("s2", "cli", title="deploy")
    db.create_session("s3", "cli", title="DEPLOY")
    assert db.get_session_by_title("deploy")["id"] == "s2"
    assert db.get_session_by_title("DEPLOY")["id"] == "s3"


def test_clearing_title_frees_it(db: SessionDB) -> None:
    db.create_session("s1", "cli", title="T")
    db.create_session("s2", "cli")
    for empty in ("", "   ", "\u200b", None):
        db.set_session_title("s1", "T")
        assert db.set_session_title("s1", empty) is True
        assert db.get_session_title("s1") is None
    db.set_session_title("s2", "T")
    assert db.get_session_title("s2") == "T"


def test_many_untitled_sessions_coexist(db: SessionDB) -> None:
    for i in range(3):
        db.create_session(f"s{i}", "cli", title="   ")
    assert [db.get_session_title(f"s{i}") for i in range(3)] == [None, None, None]


# -- lineage -----------------------------------------------------------------------------

def test_resolve_by_title_newest_variant(db: SessionDB, make_session) -> None:
    make_session("a1", 1.0, title="name")
    make_session("a2", 2.0, title="name #2")
    make_session("a3", 3.0, title="name #3")
    assert db.resolve_session_by_title("name") == "a3"


def test_resolve_by_title_is_newest_not_highest_number(db: SessionDB, make_session) -> None:
    make_session("a1", 1.0, title="name")
    make_session("a5", 2.0, title="name #5")
    make_session("a3", 3.0, title="name #3")
    assert db.resolve_session_by_title("name") == "a3"


def test_resolve_by_title_exact_competes(db: SessionDB, make_session) -> None:
    make_session("v", 1.0, title="name #2")
    make_session("e", 2.0, title="name")
    assert db.resolve_session_by_title("name") == "e"


def test_resolve_by_title_exact_only_and_missing(db: SessionDB, make_session) -> None:
    make_session("e", 1.0, title="name")
    assert db.resolve_session_by_title("name") == "e"
    assert db.resolve_session_by_title("other") is None
    assert db.resolve_session_by_title("nam") is None


def test_resolve_by_title_ignores_other_lineages(db: SessionDB, make_session) -> None:
    make_session("mine", 1.0, title="name")
    make_session("case", 2.0, title="Name #2")        # another (case-distinct) lineage
    make_session("word", 3.0, title="name #draft")    # not a numbered variant
    make_session("deep", 4.0, title="name #2 #3")     # variant of "name #2"
    make_session("long", 5.0, title="name #2x")
    assert db.resolve_session_by_title("name") == "mine"
    assert db.resolve_session_by_title("name #2") == "deep"


def test_resolve_by_title_escapes_wildcards(db: SessionDB, make_session) -> None:
    make_session("pct", 1.0, title="50% off")
    make_session("x", 2.0, title="50XX off #2")
    make_session("under", 3.0, title="a_b")
    make_session("axb", 4.0, title="axb #2")
    make_session("slash", 5.0, title="c\\d")
    assert db.resolve_session_by_title("50% off") == "pct"
    assert db.resolve_session_by_title("50%") is None
    assert db.resolve_session_by_title("a_b") == "under"
    assert db.resolve_session_by_title("c\\d") == "slash"


def test_next_title_in_lineage(db: SessionDB) -> None:
    assert db.get_next_title_in_lineage("Fresh") == "Fresh"
    db.create_session("s1", "cli", title="My Proj")
    assert db.get_next_title_in_lineage("My Proj") == "My Proj #2"
    db.create_session("s2", "cli", title="My Proj #2")
    assert db.get_next_title_in_lineage("My Proj") == "My Proj #3"
    assert db.get_next_title_in_lineage("My Proj #2") == "My Proj #3"
    db.create_session("s7", "cli", title="My Proj #7")
    assert db.get_next_title_in_lineage("My Proj") == "My Proj #8"


def test_next_title_is_always_free(db: SessionDB) -> None:
    db.create_session("s0", "cli", title="T")
    for i in range(1, 5):
        title = db.get_next_title_in_lineage("T")
        assert title == f"T #{i + 1}"
        db.create_session(f"s{i}", "cli", title=title)
    assert db.resolve_session_by_title("T") in {f"s{i}" for i in range(5)}


def test_next_title_from_numbered_name_without_family(db: SessionDB) -> None:
    assert db.get_next_title_in_lineage("Nope #5") == "Nope"


def test_next_title_escapes_wildcards(db: SessionDB) -> None:
    db.create_session("s1", "cli", title="50% off")
    db.create_session("s2", "cli", title="a_b #4")
    assert db.get_next_title_in_lineage("50X off") == "50X off"
    assert db.get_next_title_in_lineage("50% off") == "50% off #2"
    assert db.get_next_title_in_lineage("axb") == "axb"
    assert db.get_next_title_in_lineage("a_b") == "a_b #5"


def test_next_title_lineage_is_case_sensitive(db: SessionDB) -> None:
    # Titles are unique case-sensitively, so "cd #2" is no relative of "CD".
    db.create_session("s1", "cli", title="cd #2")
    db.create_session("s2", "cli", title="CD")
    assert db.get_next_title_in_lineage("CD") == "CD #2"
    assert db.get_next_title_in_lineage("cd") == "cd #3"
    assert db.resolve_session_by_title("CD") == "s2"


@pytest.mark.sqlite_only
def test_nul_in_a_lookup_matches_nothing_it_should_not(db: SessionDB) -> None:
    # LIKE read pattern and value as C strings: a NUL ended both.
    db.create_session("a\x00x", "cli", title="ab")
    db.create_session("s", "cli")
    assert db.resolve_session_id("a\x00y") is None
    assert db.resolve_session_id("a\x00") == "a\x00x"
    assert db.resolve_session_id("s\x00") is None
    assert db.resolve_session_by_title("ab\x00") is None
    assert db.get_next_title_in_lineage("ab\x00") == "ab\x00"
