"""Prompt-set loading: JSONL (UnlearnCanvas-metadata style) and plain-text prompt files.

Bad lines are counted and reported, never silently dropped and never fatal on their own; a file
that is missing, empty, not UTF-8, or has no usable line at all raises :class:`PromptFileError`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _decode_utf8(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = data.count(b"\n", 0, error.start) + 1
        raise PromptFileError(
            f"Prompt file {path} is not UTF-8: invalid byte 0x{data[error.start]:02x} at byte offset "
            f"{error.start} (line {line_number}); re-save the file as UTF-8."
        ) from error
    return text.removeprefix("\ufeff")


def _text_from_json_line(line: str, text_field: str) -> tuple[str | None, str | None]:
    """Returns ``(text, None)`` for a usable line or ``(None, reason)``."""
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg})"
    if not isinstance(record, dict):
        return None, f"not a JSON object ({type(record).__name__})"
    if text_field not in record:
        return None, f"no {text_field!r} field"
    value = record[text_field]
    if not isinstance(value, str):
        return None, f"{text_field!r} is {type(value).__name__}, not a string"
    if not value.strip():
        return None, f"empty {text_field!r}"
    return value.strip(), None


def load_prompts(path: str | Path, text_field: str = "text", limit: int | None = None) -> PromptSet:
    """Read prompts from a ``.jsonl``/``.ndjson`` file (one object per line with ``text_field``)
    or a ``.txt`` file (one prompt per line). Blank lines are ignored.

    Args:
        path: the prompt file.
        text_field: JSON key holding the prompt (JSONL only).
        limit: keep at most this many unique prompts (``None`` keeps all).

    Raises:
        PromptFileError: missing file, empty file, not UTF-8, unsupported suffix, or no valid line.
    """
    path = Path(path)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive integer or None, got {limit}.")
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
    text = _decode_utf8(path, path.read_bytes())
    if not text.strip():
        raise PromptFileError(f"Prompt file {path} is empty; re-provision it or choose another prompt file.")

    is_jsonl = suffix in JSONL_SUFFIXES
    texts: list[str] = []
    seen: set[str] = set()
    invalid: list[InvalidLine] = []
    n_lines = n_valid = n_duplicates = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n_lines += 1
        if is_jsonl:
            prompt, reason = _text_from_json_line(line, text_field)
        else:
            prompt, reason = line.strip(), None
        if prompt is None:
            invalid.append(InvalidLine(line_number, reason or "invalid"))
            continue
        n_valid += 1
        if prompt in seen:
            n_duplicates += 1
            continue
        seen.add(prompt)
        texts.append(prompt)

    if n_valid == 0:
        reasons = Counter(line.reason for line in invalid)
        summary = ", ".join(f"{reason} ({count} lines)" for reason, count in reasons.most_common(5))
        raise PromptFileError(f"Prompt file {path} has no valid prompt line: {summary}.")
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
    """Write one ``{"text": ...}`` object per line (UTF-8, atomic rename); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    with temporary.open("w", encoding="utf-8", newline="\n") as handle:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"prompts must be strings, got {type(text).__name__}.")
            handle.write(json.dumps({text_field: text}, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return path
