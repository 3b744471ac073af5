"""Tests for ddr_core.prompts: JSONL/txt loading, error reporting and token-length checks."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from ddr_core.prompts import (
    InvalidLine,
    PromptFileError,
    check_prompt_lengths,
    load_prompts,
    truncation_warning,
    write_prompts_jsonl,
)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_unique_first_occurrence_and_reports_invalid(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "metadata.jsonl",
        [
            json.dumps({"text": "A cat in Van Gogh style.", "style": "Van_Gogh", "object": "Cats"}),
            "",
            json.dumps({"text": "A dog in Monet style."}),
            "{broken json",
            json.dumps({"caption": "no text field"}),
            json.dumps({"text": 42}),
            json.dumps({"text": "   "}),
            json.dumps(["a", "list"]),
            json.dumps({"text": "A cat in Van Gogh style."}),
            json.dumps({"text": "Ein Bär im Stil von Monet."}),
        ],
    )
    prompts = load_prompts(path)
    assert prompts.texts == [
        "A cat in Van Gogh style.",
        "A dog in Monet style.",
        "Ein Bär im Stil von Monet.",
    ]
    assert (prompts.n_lines, prompts.n_valid, prompts.n_duplicates) == (9, 4, 1)
    assert [line.line_number for line in prompts.invalid] == [4, 5, 6, 7, 8]
    reasons = [line.reason for line in prompts.invalid]
    assert reasons[0].startswith("invalid JSON")
    assert reasons[1:] == [
        "no 'text' field",
        "'text' is int, not a string",
        "empty 'text'",
        "not a JSON object (list)",
    ]
    assert prompts.source == path
    assert "3 unique prompts" in prompts.summary() and "5 invalid" in prompts.summary()


def test_custom_field_and_limit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(5)])
    prompts = load_prompts(path, text_field="prompt", limit=2)
    assert prompts.texts == ["p0", "p1"]
    assert prompts.n_valid == 5  # counts describe the whole file


def test_txt_one_prompt_per_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red car\n\n  a blue house  \r\na red car\n".encode())
    prompts = load_prompts(path)
    assert prompts.texts == ["a red car", "a blue house"]
    assert (prompts.n_lines, prompts.n_valid, prompts.n_duplicates, prompts.invalid) == (3, 3, 1, [])


def test_missing_file_says_how_to_provision(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="does not exist; provision the prompt dataset"):
        load_prompts(tmp_path / "absent.jsonl")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(PromptFileError, match="is empty"):
        load_prompts(path)


def test_not_utf8_names_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        PromptFileError, match=r"0xe9 at byte offset 28 \(line 2\); re-save the file as UTF-8"
    ):
        load_prompts(path)


def test_no_valid_line_summarises_reasons(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "bad.jsonl", ["{nope", json.dumps({"caption": "x"}), json.dumps({"caption": "y"})]
    )
    with pytest.raises(
        PromptFileError, match=r"no valid prompt line: no 'text' field \(2 lines\), invalid JSON"
    ):
        load_prompts(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text("a,b\n")
    with pytest.raises(PromptFileError, match="unsupported suffix '.csv'"):
        load_prompts(path)


def test_write_round_trip(tmp_path: Path) -> None:
    texts = ["first", 'with "quotes"', "ünïcödé"]
    path = write_prompts_jsonl(texts, tmp_path / "out" / "prompts.jsonl")
    assert not (tmp_path / "out" / "prompts.jsonl.part").exists()
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[2]) == {"text": "ünïcödé"}
    assert load_prompts(path).texts == texts


@pytest.fixture
def tiny_clip_tokenizer(tmp_path: Path):
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in string.ascii_lowercase:
            vocab[char + suffix] = len(vocab)
    vocab["ca"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\n")
    return CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=6)


def test_check_prompt_lengths_with_real_clip_tokenizer(tiny_clip_tokenizer) -> None:
    # "cat" -> <bos> ca t</w> <eos> = 4 tokens; "cab" -> 4; "abcd" -> 6 (= limit); "abcde" -> 7 (over).
    texts = ["cat", "abcde", "abcd", "a cat dog"]
    assert check_prompt_lengths(texts, tiny_clip_tokenizer) == [1, 3]
    assert check_prompt_lengths([], tiny_clip_tokenizer) == []


class WordTokenizer:
    """Minimal HF-like tokenizer: one token per whitespace word plus bos/eos."""

    model_max_length = 4

    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [[0] + [1] * len(text.split()) + [2] for text in texts]}


def test_check_prompt_lengths_with_simple_tokenizer() -> None:
    assert check_prompt_lengths(["one two", "one two three", "a"], WordTokenizer()) == [1]


def test_truncation_warning_text() -> None:
    assert truncation_warning(0) == ""
    assert (
        truncation_warning(1)
        == "1 prompt is longer than the text encoder's token limit and will be truncated by the pipeline."
    )
    assert (
        truncation_warning(3, 100, 77)
        == "3 of 100 prompts are longer than 77 tokens and will be truncated by the pipeline."
    )


def test_invalid_line_is_plain_data() -> None:
    assert InvalidLine(3, "x") == InvalidLine(3, "x")


# --- hostile prompt files: every bad line is counted with its number and reason, nothing crashes ---------


def test_deeply_nested_json_line_is_an_invalid_line_not_a_recursion_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"text": "a cat"}), "[" * 100_000 + "]" * 100_000,
                                              '{"text": ' + "[" * 50_000 + "]" * 50_000 + "}"])
    prompts = load_prompts(path)
    assert prompts.texts == ["a cat"]
    assert [(i.line_number, i.reason) for i in prompts.invalid] == [
        (2, "invalid JSON (nested too deeply)"), (3, "invalid JSON (nested too deeply)")]


def test_repeated_key_and_overlong_number_are_invalid_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", ['{"text": "a cat", "text": "a dog"}', '{"n": ' + "1" * 5000 + "}",
                                              json.dumps({"text": "a cow"})])
    prompts = load_prompts(path)
    assert prompts.texts == ["a cow"]
    assert [(i.line_number, i.reason) for i in prompts.invalid] == [
        (1, "duplicate key 'text'"), (2, "invalid JSON (a number too long to read)")]


def test_huge_line_is_skipped_without_being_read_into_memory(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "p.jsonl"
    size = 64 << 20
    with path.open("wb") as handle:
        handle.write(b'{"text": "a cat"}\n')
        handle.truncate(handle.tell() + size)  # a 64 MiB line of NUL bytes (a sparse file: no disk used)
        handle.seek(0, 2)
        handle.write(b'\n{"text": "a dog"}\n')
    tracemalloc.start()
    try:
        prompts = load_prompts(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes for a {size}-byte line"
    assert prompts.texts == ["a cat", "a dog"]
    assert [(i.line_number, i.reason) for i in prompts.invalid] == [(2, "line longer than 1048576 bytes")]


def test_line_length_bound_is_a_parameter_and_counts_the_line_end_out(tmp_path: Path) -> None:
    exact = json.dumps({"text": "x" * 100})
    path = tmp_path / "p.jsonl"
    path.write_bytes((exact + "\r\n" + json.dumps({"text": "y" * 101}) + "\n" + exact[:-1]).encode())
    prompts = load_prompts(path, max_line_bytes=len(exact))
    assert prompts.texts == ["x" * 100]
    assert [(i.line_number, i.reason) for i in prompts.invalid] == [
        (2, f"line longer than {len(exact)} bytes"), (3, "invalid JSON (Expecting ',' delimiter)")]


def test_lone_surrogate_and_control_characters_are_counted_invalid_naming_the_line(
        tmp_path: Path, tiny_clip_tokenizer) -> None:
    lines = [
        json.dumps({"text": "a cat"}),
        '{"text": "a \\ud800 cat"}',  # a lone surrogate: the tokenizer raised a TypeError naming no line
        '{"text": "nul\\u0000byte"}',
        '{"text": "\\u001b[31mred"}',  # a terminal escape sequence
        '{"text": "del\\u007f"}',
        '{"text": "two\\nlines"}',  # whitespace controls are kept: the tokenizer reads them as spaces
        '{"text": "a\\ttab"}',
        '{"text": "a smiley \\ud83d\\ude00"}',  # a surrogate *pair* is one valid character
    ]
    path = write_lines(tmp_path / "p.jsonl", lines)
    prompts = load_prompts(path)
    assert prompts.texts == ["a cat", "two\nlines", "a\ttab", "a smiley \U0001F600"]
    assert [(i.line_number, i.reason) for i in prompts.invalid] == [
        (2, "'text': lone surrogate U+D800 (not encodable as UTF-8)"),
        (3, "'text': control character U+0000"),
        (4, "'text': control character U+001B"),
        (5, "'text': control character U+007F"),
    ]
    assert len(tiny_clip_tokenizer(prompts.texts)["input_ids"]) == 4  # every loaded prompt tokenizes


def test_txt_line_with_a_control_character_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\nnul\x00byte\nold\rmac\nesc\x1b[0m\n")
    prompts = load_prompts(path)
    assert prompts.texts == ["a cat", "old", "mac"]  # a lone \r still ends a prompt in a text file
    assert [(i.line_number, i.reason) for i in prompts.invalid] == [
        (2, "line: control character U+0000"), (4, "line: control character U+001B")]
    assert prompts.n_lines == 5


def test_unicode_line_separator_inside_a_json_string_stays_one_line(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) writes U+2028 raw; str.splitlines() used to cut the line there.
    path = write_prompts_jsonl(["first\u2028second", "other"], tmp_path / "p.jsonl")
    prompts = load_prompts(path)
    assert prompts.texts == ["first\u2028second", "other"] and prompts.invalid == []


def test_write_refuses_a_prompt_load_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"prompt 1 'a \\ud800': prompt: lone surrogate U\+D800"):
        write_prompts_jsonl(["ok", "a \ud800"], tmp_path / "p.jsonl")
    assert not (tmp_path / "p.jsonl").exists()
