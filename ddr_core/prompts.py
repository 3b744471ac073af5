"""Prompt-set loading: JSONL (UnlearnCanvas-metadata style) and plain-text prompt files.

Bad lines are counted and reported with their line number and reason, never silently dropped and never
fatal on their own: invalid or too deeply nested JSON, a repeated key, a missing / non-string / empty text
field, a prompt holding a lone surrogate or a control character, a line longer than :data:`MAX_LINE_BYTES`
(skipped without being read into memory). A file that is missing, empty, not UTF-8, or has no usable line at
all raises :class:`PromptFileError`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddr_core.json_input import parse_json

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt",)


class PromptFileError(ValueError):
    """A prompt file cannot be used at all (missing, empty, not UTF-8, or no valid line)."""


@dataclass(frozen=True)
class InvalidLine:
    """One skipped line: 1-based ``line_number`` in the file and a human-readable ``reason``."""

    line_number: int
    reason: str

    @property
    def line(self) -> int:
        """Alias of ``line_number``."""
        return self.line_number


@dataclass
class PromptSet:
    """Prompts read from one file.

    Attributes:
        texts: unique prompt texts in first-occurrence order (at most ``limit`` of them).
        n_lines: non-blank lines in the file.
        n_valid: lines that held a usable prompt (duplicates included).
        n_duplicates: valid lines whose text had already been seen.
        invalid: every skipped line with its reason.
        source: the file read.

    Counts describe the whole file even when ``limit`` shortened ``texts``.
    """

    texts: list[str]
    n_lines: int
    n_valid: int
    n_duplicates: int
    invalid: list[InvalidLine] = field(default_factory=list)
    source: Path = Path()

    def summary(self) -> str:
        """One line for logs / asset metadata."""
        text = (
            f"{len(self.texts)} unique prompts from {self.source.name} "
            f"({self.n_lines} lines, {self.n_valid} valid, {self.n_duplicates} duplicates, {len(self.invalid)} invalid)"
        )
        if self.invalid:
            reasons = Counter(line.reason for line in self.invalid)
            text += "; invalid: " + ", ".join(
                f"{reason} x{count}" for reason, count in reasons.most_common(5)
            )
        return text


MAX_LINE_BYTES = 1 << 20
"""Longest line of a prompt file that is read (bytes, line end excluded): a longer line is counted invalid
and skipped without being held in memory (a prompt is at most a few hundred bytes; the text encoder reads
77 tokens)."""

_READ_CHUNK = 1 << 16
_UNUSABLE_CHAR = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff]")
"""Control characters (Unicode category Cc) that are not whitespace, and surrogates (:func:`text_problem`)."""


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be used as a prompt or label, or ``None``.

    Refused: a lone surrogate (JSON ``"\\ud800"``: not encodable as UTF-8, so the tokenizer fails on it)
    and the control characters that are not whitespace (NUL, escape sequences, backspace, DEL ...: Unicode
    category ``Cc`` less ``str.isspace``). Whitespace controls (tab, a line break inside a JSON string) are kept:
    the tokenizer reads them as spaces, and every display escapes them. The reason names the first offending
    character.
    """
    match = _UNUSABLE_CHAR.search(text)
    if match is None:
        return None
    char = match.group()
    if "\ud800" <= char <= "\udfff":
        return f"lone surrogate U+{ord(char):04X} (not encodable as UTF-8)"
    return f"control character U+{ord(char):04X}"


def iter_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str | None, str | None]]:
    """The non-blank lines of a UTF-8 file, read line by line: ``(line_number, text, None)``, or
    ``(line_number, None, reason)`` for a line longer than ``max_line_bytes`` (skipped unread).

    Lines end at ``\\n`` (a ``\\r`` before it is dropped); a leading byte-order mark is ignored. Other
    Unicode line separators (U+2028, ...) stay inside the line, as JSON allows them in strings.

    Raises:
        PromptFileError: a line is not UTF-8 (naming the line, the byte offset and the byte).
    """
    offset = 0
    with path.open("rb") as handle:
        for line_number in itertools.count(1):
            start = offset
            chunk = handle.readline(max_line_bytes + 2)  # + 2: room for the line end
            if not chunk:
                return
            offset += len(chunk)
            raw = chunk.removesuffix(b"\n").removesuffix(b"\r")
            if len(raw) > max_line_bytes:
                while chunk and not chunk.endswith(b"\n"):  # skip the rest of the line, a chunk at a time
                    chunk = handle.readline(_READ_CHUNK)
                    offset += len(chunk)
                yield line_number, None, f"line longer than {max_line_bytes} bytes"
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise PromptFileError(
                    f"Prompt file {path} is not UTF-8: invalid byte 0x{raw[error.start]:02x} at byte offset "
                    f"{start + error.start} (line {line_number}); re-save the file as UTF-8."
                ) from error
            if line_number == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                yield line_number, line, None


def parse_json_line(line: str) -> tuple[Any, str | None]:
    """``(value, None)`` for a line holding one JSON value, else ``(None, reason)``
    (:func:`ddr_core.json_input.parse_json`: invalid or too deeply nested JSON, a number too long to convert,
    a key written twice)."""
    return parse_json(line)


def prompt_from_record(record: Any, text_field: str) -> tuple[str | None, str | None]:
    """``(stripped prompt, None)`` for a JSON object with a usable ``text_field``, else ``(None, reason)``."""
    if not isinstance(record, dict):
        return None, f"not a JSON object ({type(record).__name__})"
    if text_field not in record:
        return None, f"no {text_field!r} field"
    value = record[text_field]
    if not isinstance(value, str):
        return None, f"{text_field!r} is {type(value).__name__}, not a string"
    return _usable(value, repr(text_field))


def _usable(value: str, what: str) -> tuple[str | None, str | None]:
    if not value.strip():
        return None, f"empty {what}"
    problem = text_problem(value)
    if problem is not None:
        return None, f"{what}: {problem}"
    return value.strip(), None


def load_prompts(path: str | Path, text_field: str = "text", limit: int | None = None,
                 max_line_bytes: int = MAX_LINE_BYTES) -> PromptSet:
    """Read prompts from a ``.jsonl``/``.ndjson`` file (one object per line with ``text_field``)
    or a ``.txt`` file (one prompt per line). Blank lines are ignored.

    The file is read line by line; a line is counted invalid (with its line number and reason) when it
    is longer than ``max_line_bytes``, is not one JSON object with a string ``text_field`` (JSONL), or its
    prompt is empty or holds a lone surrogate or a control character (:func:`text_problem`).

    Args:
        path: the prompt file.
        text_field: JSON key holding the prompt (JSONL only).
        limit: keep at most this many unique prompts (``None`` keeps all).
        max_line_bytes: longest line read (:data:`MAX_LINE_BYTES`).

    Raises:
        PromptFileError: missing file, empty file, not UTF-8, unsupported suffix, or no valid line.
    """
    path = Path(path)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive integer or None, got {limit}.")
    if not text_field:
        raise ValueError("text_field must name the JSON field holding the prompt, e.g. 'text'.")
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + TEXT_SUFFIXES:
        raise PromptFileError(
            f"Prompt file {path} has unsupported suffix {suffix!r}; use JSONL ({', '.join(JSONL_SUFFIXES)}) "
            f"with a {text_field!r} field per line, or .txt with one prompt per line."
        )
    if not path.is_file():
        raise PromptFileError(
            f"Prompt file {path} does not exist; provision the prompt dataset first "
            f"(run the provisioning step / asset for it) or point the prompts path in the config at an existing file."
        )

    is_jsonl = suffix in JSONL_SUFFIXES
    texts: list[str] = []
    seen: set[str] = set()
    invalid: list[InvalidLine] = []
    n_lines = n_valid = n_duplicates = 0

    def _add(line_number: int, prompt: str | None, reason: str | None) -> None:
        nonlocal n_valid, n_duplicates
        if prompt is None:
            invalid.append(InvalidLine(line_number, reason or "invalid"))
        elif prompt in seen:
            n_valid += 1
            n_duplicates += 1
        else:
            n_valid += 1
            seen.add(prompt)
            texts.append(prompt)

    for line_number, line, reason in iter_lines(path, max_line_bytes):
        n_lines += 1
        prompt: str | None = None
        if line is not None:
            if is_jsonl:
                record, reason = parse_json_line(line)
                if reason is None:
                    prompt, reason = prompt_from_record(record, text_field)
            else:  # text file: other line separators (\r, \f, U+2028, ...) end a prompt too, on the same line
                pieces = [piece for piece in line.splitlines() if piece.strip()]
                n_lines += len(pieces) - 1
                for piece in pieces:
                    _add(line_number, *_usable(piece, "line"))
                continue
        _add(line_number, prompt, reason)

    if n_lines == 0:
        raise PromptFileError(f"Prompt file {path} is empty; re-provision it or choose another prompt file.")
    if n_valid == 0:
        reasons = Counter(line.reason for line in invalid)
        summary = ", ".join(f"{reason} ({count} lines)" for reason, count in reasons.most_common(5))
        first = ", ".join(f"line {line.line_number}" for line in invalid[:5])
        raise PromptFileError(f"Prompt file {path} has no valid prompt line: {summary}; first: {first}.")
    if limit is not None:
        texts = texts[:limit]
    return PromptSet(
        texts=texts, n_lines=n_lines, n_valid=n_valid, n_duplicates=n_duplicates, invalid=invalid, source=path
    )


def check_prompt_lengths(texts: Sequence[str], tokenizer: Any) -> list[int]:
    """Indices of prompts whose token count (bos/eos included) exceeds ``tokenizer.model_max_length``.

    ``tokenizer`` is any HF-tokenizer-like callable: ``tokenizer(list_of_texts)`` returns a mapping
    whose ``"input_ids"`` is a list of token-id lists (special tokens included). The diffusion pipeline
    truncates such prompts; callers warn with :func:`truncation_warning`.
    """
    if not texts:
        return []
    max_length = int(tokenizer.model_max_length)
    input_ids = tokenizer(list(texts))["input_ids"]
    return [index for index, ids in enumerate(input_ids) if len(ids) > max_length]


def truncation_warning(n_truncated: int, n_total: int | None = None, max_length: int | None = None) -> str:
    """Human-readable warning that ``n_truncated`` prompts will be cut to the text encoder's limit."""
    if n_truncated <= 0:
        return ""
    of_total = f" of {n_total}" if n_total is not None else ""
    limit = f"{max_length} tokens" if max_length is not None else "the text encoder's token limit"
    noun = "prompt is" if n_truncated == 1 else "prompts are"
    return f"{n_truncated}{of_total} {noun} longer than {limit} and will be truncated by the pipeline."


def write_prompts_jsonl(texts: Iterable[str], path: str | Path, text_field: str = "text") -> Path:
    """Write one ``{"text": ...}`` object per line (UTF-8, atomic rename); returns ``path``.

    Raises:
        TypeError / ValueError: a prompt is not a string, or :func:`load_prompts` would refuse it (empty, a
            lone surrogate or a control character), naming its index; nothing is written then.
    """
    path = Path(path)
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {index} must be a string, got {type(text).__name__}.")
        prompt, reason = _usable(text, "prompt")
        if prompt is None:
            raise ValueError(f"prompt {index} {text[:60]!r}: {reason}; clean the text before writing it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    with temporary.open("w", encoding="utf-8", newline="\n") as handle:
        for text in texts:
            handle.write(json.dumps({text_field: text}, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return path
