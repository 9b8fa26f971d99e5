"""The readable copy of a framework's item or event: the text an adapter puts in a
message's ``content`` (and ``role``, ``tool_name`` ...) for search and display, beside
the item's exact JSON, which keeps every character."""

from __future__ import annotations

__all__ = ["plain_text"]


def plain_text(text: str) -> str:
    """``text`` as every backend stores it: NUL characters dropped (PostgreSQL refuses
    them in text) and lone surrogates replaced by ``?`` (they are not Unicode, and
    cannot be encoded as UTF-8). Text without either is returned as it is."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text
