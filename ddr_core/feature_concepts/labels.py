"""The concept labels of prompts: label parsers of a world's prompt text, labelled prompt files, and the
labels of a prompt dataset (:func:`prompt_labels`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ddr_core.config import ConceptLabelsConfig


@dataclass(frozen=True)
class LabelParser:
    """A parser of concept labels from prompt text, and the prompts of its world."""

    parse: Callable[[str], dict[str, str]]
    families: tuple[str, ...]
    prompts: Callable[[], Sequence[str]]


def _toy_world_parser() -> LabelParser:
    from ddr_core.toy_world import CONCEPTS, parse_prompt, world_prompts

    return LabelParser(parse=parse_prompt, families=tuple(CONCEPTS), prompts=world_prompts)


LABEL_PARSER_FACTORIES: dict[str, Callable[[], LabelParser]] = {"toy-world": _toy_world_parser}
"""Parser name (``labels.parser`` in the project config) -> its :class:`LabelParser`."""


def label_parser(name: str) -> LabelParser:
    if name not in LABEL_PARSER_FACTORIES:
        raise KeyError(f"unknown label parser {name!r}; known: {sorted(LABEL_PARSER_FACTORIES)}")
    return LABEL_PARSER_FACTORIES[name]()


def labelled_prompt_records(prompts: Sequence[str], parser: str) -> list[dict[str, str]]:
    """``{"text": prompt, <family>: <value>, ...}`` for each prompt, labels from ``parser``."""
    parse = label_parser(parser).parse
    return [{"text": prompt, **parse(prompt)} for prompt in prompts]


def write_labelled_prompts(path: str | Path, prompts: Sequence[str], parser: str) -> Path:
    """Write a labelled prompt JSONL (one :func:`labelled_prompt_records` object per line, sorted keys
    after ``text``, UTF-8, ``\\n`` line ends): deterministic bytes for the same prompts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in labelled_prompt_records(prompts, parser):
        ordered = {"text": record["text"], **{k: record[k] for k in sorted(record) if k != "text"}}
        lines.append(json.dumps(ordered, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
    return path


def prompt_labels(prompts_file: str | Path, labels: ConceptLabelsConfig, text_field: str = "text",
                  prompts: Sequence[str] | None = None) -> pl.DataFrame:
    """Concept labels of prompts: ``prompt`` + one string column per family (null when unknown).

    With ``labels.parser`` the labels come from the prompt text of ``prompts`` (default: the prompts
    of ``prompts_file``); a prompt the parser rejects gets nulls. Without a parser every JSONL line
    of ``prompts_file`` that :func:`ddr_core.prompts.load_prompts` accepts gives a row (the lines it counts
    invalid give none); its family fields must be strings (missing: null). Prompt text is stripped, as
    :func:`ddr_core.prompts.load_prompts` does.

    Raises:
        FileNotFoundError: the prompt file is missing (JSONL mode).
        ValueError: a label field holds a non-string, a lone surrogate or a control character, or one prompt
            has two different label sets (naming the line); the file is not UTF-8
            (:class:`ddr_core.prompts.PromptFileError`, naming the line).
    """
    families = list(labels.families)
    rows: dict[str, dict[str, str | None]] = {}
    if labels.parser is not None:
        if prompts is None:
            from ddr_core.prompts import load_prompts

            prompts = load_prompts(prompts_file, text_field=text_field).texts
        parse = label_parser(labels.parser).parse
        for prompt in prompts:
            try:
                parsed: dict[str, str | None] = dict(parse(prompt))
            except ValueError:
                parsed = {}
            rows[prompt.strip()] = {family: parsed.get(family) for family in families}
    else:
        from ddr_core.prompts import iter_lines, parse_json_line, prompt_from_record, text_problem

        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist; provision the prompt dataset first")
        # Read line by line as load_prompts does (same line numbers, same bounded line length); a line it
        # counts invalid (bad JSON, too long, no usable text field) gives no labels either.
        for number, line, reason in iter_lines(path):
            if line is None:
                continue
            record, reason = parse_json_line(line)
            if reason is not None:
                continue
            text, reason = prompt_from_record(record, text_field)
            if text is None:
                continue
            values: dict[str, str | None] = {}
            for family in families:
                value = record.get(family)
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{path} line {number}: label field {family!r} is {type(value).__name__}, "
                                     f"not a string")
                problem = None if value is None else text_problem(value)
                if problem is not None:
                    raise ValueError(f"{path} line {number}: label field {family!r}: {problem}; fix the label "
                                     f"(a plain string such as \"red\")")
                values[family] = value
            if text in rows and rows[text] != values:
                raise ValueError(f"{path} line {number}: prompt {text!r} appears with two label sets "
                                 f"({rows[text]} and {values})")
            rows[text] = values
    schema = {"prompt": pl.String, **{family: pl.String for family in families}}
    return pl.DataFrame([{"prompt": p, **v} for p, v in rows.items()], schema=schema, orient="row")
