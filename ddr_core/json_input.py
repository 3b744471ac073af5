"""Reading JSON that a user wrote or edited (prompt lines, the feature-concepts baseline, ...).

``json.loads`` alone lets such a file crash or mislead: a deeply nested value raises ``RecursionError``, a
number over 4300 digits a ``ValueError`` that advises changing the interpreter, and a key written twice
silently keeps the last value. :func:`parse_json` turns each into a reason; :func:`read_json_file` into a
:class:`JsonFileError` naming the file, the line and column, and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_JSON_FILE_BYTES = 16 << 20
"""Largest JSON file :func:`read_json_file` reads by default."""


class JsonFileError(ValueError):
    """A JSON file cannot be used; the message names the file, where, and the fix."""


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKeyError(key)
        record[key] = value
    return record


def parse_json(text: str) -> tuple[Any, str | None]:
    """``(value, None)`` for a JSON text, else ``(None, reason)``: invalid JSON (with the parser's message),
    nested too deeply (it would exhaust Python's recursion limit), a number too long to convert, or an object
    with a key written twice (which of its values counts would be a guess)."""
    value, reason, _ = _parse(text)
    return value, reason


def _parse(text: str) -> tuple[Any, str | None, str]:
    """:func:`parse_json` plus `` at line L column C`` where the parser stopped (invalid JSON only)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys), None, ""
    except RecursionError:
        return None, "invalid JSON (nested too deeply)", ""
    except _DuplicateKeyError as error:
        return None, f"duplicate key {error.key!r}", ""
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg})", f" at line {error.lineno} column {error.colno}"
    except ValueError:  # int() of a number literal over sys.get_int_max_str_digits() digits
        return None, "invalid JSON (a number too long to read)", ""


def read_json_file(path: str | Path, fix: str, max_bytes: int = MAX_JSON_FILE_BYTES) -> Any:
    """The JSON value of a user's file.

    Args:
        path: the file (must exist; callers say how to make a missing one).
        fix: what to do about a bad file, appended to the message (e.g. ``"rewrite it with ..."``).
        max_bytes: refuse a larger file before reading it.

    Raises:
        JsonFileError: larger than ``max_bytes``, not UTF-8, or not valid JSON (:func:`parse_json`), naming the
            file, the line and column where the parser stopped, and ``fix``.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise JsonFileError(f"{path}: {size} bytes, more than the {max_bytes} read; {fix}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise JsonFileError(f"{path}: not UTF-8 (byte 0x{data[error.start]:02x} on line {line}); {fix}") from None
    value, reason, where = _parse(text.removeprefix("\ufeff"))
    if reason is not None:
        raise JsonFileError(f"{path}: {reason}{where}; {fix}")
    return value
