"""Exports as streams of JSON: reading and writing them a session at a time.

An export is a JSON list of sessions (``sessiondb export``'s default) or JSON Lines, one
session per line (``--jsonl``). A million-message store is a file of about 1.5 GB, so
neither is read with ``json.load`` nor written with ``json.dumps`` of the whole: the
writers emit one session at a time, and :func:`read_items` decodes one at a time with
:meth:`json.JSONDecoder.raw_decode` over a buffer that holds about the session being
decoded, whatever the format.

Nothing here touches a store (pure functions of file objects).
"""

from __future__ import annotations

import codecs
import json
import re
from typing import IO, Any, Iterable, Iterator, Protocol

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 20
# A decode error this close to the end of the buffer may be a value cut by the chunk
# boundary (a literal, a number, an escape), not bad JSON: read on before deciding.
_NEAR_END = 16


class ExportFormatError(ValueError):
    """The input is not a JSON list nor JSON Lines (``.line``, ``.column`` say where)."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{message} (line {line}, column {column})")
        self.line, self.column = line, column


class _Buffer:
    """Text read from ``source`` (binary or text, decoded as UTF-8 with or without a
    BOM) a chunk at a time, with a read position."""

    def __init__(self, source: IO[Any], chunk: int) -> None:
        self.source, self.chunk = source, chunk
        self.text, self.pos = "", 0
        self.eof = False
        self.bytes_read = 0
        self._lines_before = 0  # newlines in the text already dropped from the buffer
        self._offset = 0        # characters dropped
        self._line_start = 0    # where the line of the first character kept starts
        self._decode = codecs.getincrementaldecoder("utf-8-sig")("strict").decode

    def more(self, at_least: int = 0) -> bool:
        """Append the next chunk (at least ``at_least`` characters' worth, when the file
        has them); False at the end of the input."""
        if self.pos > len(self.text) // 2:  # drop what was decoded: amortized linear
            self._lines_before += self.text.count("\n", 0, self.pos)
            newline = self.text.rfind("\n", 0, self.pos)
            if newline >= 0:
                self._line_start = self._offset + newline + 1
            self._offset += self.pos
            self.text, self.pos = self.text[self.pos:], 0
        while True:
            data = self.source.read(max(self.chunk, at_least))
            self.bytes_read += len(data)
            if isinstance(data, str):
                text = data
            else:
                try:
                    text = self._decode(data, final=not data)
                except UnicodeDecodeError as exc:
                    raise self.error(f"not UTF-8 text ({exc.reason})",
                                     len(self.text)) from None
            if text:
                self.text += text
                return True
            if not data:  # (a short read can end inside a character: read on)
                self.eof = True
                return False

    def peek(self) -> str | None:
        """The next character that is not JSON whitespace (the position moves to it),
        or None at the end of the input."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return None

    def value(self) -> Any:
        """Decode the JSON value at the position (after whitespace), reading on while it
        is incomplete."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                cut = exc.msg.startswith("Unterminated string") or \
                    exc.pos >= len(self.text) - _NEAR_END
                if self.eof or not cut:
                    raise self.error(exc.msg, exc.pos) from None
                # Twice what is pending: re-decoding a long value stays linear overall.
                # (At the end of the input the next try reports the error where it is.)
                self.more(2 * (len(self.text) - self.pos))
                continue
            except RecursionError:
                raise self.error("a value nested too deeply to read", self.pos) from None
            except ValueError as exc:  # a number of more digits than Python converts
                raise self.error(f"a value Python cannot read ({exc})", self.pos) from None
            if end == len(self.text) and not isinstance(value, (dict, list, str)) \
                    and not self.eof and self.more():
                continue  # a number (or literal) may go on in the next chunk
            self.pos = end
            return value

    def error(self, message: str, pos: int) -> ExportFormatError:
        line = self._lines_before + self.text.count("\n", 0, pos) + 1
        newline = self.text.rfind("\n", 0, pos)
        start = self._offset + newline + 1 if newline >= 0 else self._line_start
        column = self._offset + pos - start + 1
        return ExportFormatError(message, line, column)


class Reader:
    """Iterates over the sessions of an export: the items of a JSON list, or the values
    of JSON Lines (any whitespace may separate them, so a single session object, even
    pretty-printed, reads as one). ``bytes_read`` is how far the input has been read.

    :param source: a file object open for reading, binary (preferred: decoded here as
        UTF-8, a BOM allowed) or text.
    :raises ExportFormatError: (while iterating) the input is neither.
    """

    def __init__(self, source: IO[Any], chunk: int = _CHUNK) -> None:
        self._buffer = _Buffer(source, chunk)

    @property
    def bytes_read(self) -> int:
        return self._buffer.bytes_read

    def __iter__(self) -> Iterator[Any]:
        buf = self._buffer
        first = buf.peek()
        if first is None:
            raise buf.error("empty input: expected a JSON list or JSON Lines", buf.pos)
        if first != "[":
            while buf.peek() is not None:
                yield buf.value()
            return
        buf.pos += 1
        if buf.peek() == "]":
            buf.pos += 1
        else:
            while True:
                yield buf.value()
                after = buf.peek()
                if after not in (",", "]"):
                    raise buf.error("expected ',' or ']' after an item of the list",
                                    buf.pos)
                buf.pos += 1
                if after == "]":
                    break
        if buf.peek() is not None:
            raise buf.error("unexpected data after the end of the list", buf.pos)


class Items(Iterator[Any]):
    """The iterator :func:`read_items` returns. It reads nothing but its source, so
    another thread may consume it: ``SessionDB.import_sessions`` reads it in a staging
    thread of its own (:mod:`sessiondb.bulk_stage`)."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self._items = iter(reader)

    def __next__(self) -> Any:
        return next(self._items)


def read_items(source: IO[Any], chunk: int = _CHUNK) -> Items:
    """The sessions of an export, one at a time (see :class:`Reader`)."""
    return Items(Reader(source, chunk))


class TextSink(Protocol):
    """Where the writers below write: a text file, or anything with its ``write``
    (:class:`sessiondb.outfile.SyncedText`)."""

    def write(self, text: str, /) -> int: ...


def write_jsonl(target: TextSink, items: Iterable[Any]) -> None:
    """Write ``items`` as JSON Lines: one compact JSON value per line, UTF-8 text as
    it is (not ``\\u`` escapes)."""
    for item in items:
        target.write(json.dumps(item, ensure_ascii=False, default=str))
        target.write("\n")


def write_json_list(target: TextSink, items: Iterable[Any]) -> None:
    """Write ``items`` as one JSON list, an item at a time, indented by 2: the same text
    as ``json.dumps(list(items), indent=2, ensure_ascii=False, default=str)`` plus a
    newline, without holding the list."""
    first = True
    target.write("[")
    for item in items:
        target.write("\n  " if first else ",\n  ")
        first = False
        # A newline inside a JSON string is escaped, so every newline of the item's
        # text is structure: indenting each line nests the item in the list.
        target.write(json.dumps(item, indent=2, ensure_ascii=False, default=str)
                     .replace("\n", "\n  "))
    target.write("]\n" if first else "\n]\n")
