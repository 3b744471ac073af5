"""Ground-truth concept scores of every channel / SAE feature of a variant whose prompts carry labels.

A model trained on a world with known concepts (:mod:`ddr_core.toy_world`: colour, shape, background)
lets a feature be scored against ground truth. For each channel (raw basis) or SAE feature of a
variant:

- **top examples**: the channel's top prompts, **one per prompt** (a prompt's best generation stands for
  it: a capture draws several images per prompt and labels belong to prompts, so counting images would
  let one prompt fill the list and no null could respect the data's structure).
  ``examples="peak_all_generations"`` (default) ranks every generation of the capture by its activation
  at the channel's highest activity peak (read from the activation store); ``"top_peak"`` uses the
  recorded dataset examples at that peak (``dataset_examples.parquet``: only generations in whose top-k
  the channel was, often few distinct prompts), ``"all_timesteps"`` those pooled over every timestep.
  ``n_examples`` keeps the first (default 10).
- **labels** of an example: the concept labels of its prompt, from the prompt dataset (JSONL fields,
  or a parser of the prompt text, e.g. :func:`ddr_core.toy_world.parse_prompt`; ``labels`` in the
  project config). Prompts without labels are left out and counted.
- **purity** of a family (colour, shape, background, ...): the share of the labelled top prompts holding
  the most common value, the **dominant** value (ties: the alphabetically first). ``purity`` is the mean
  over the families, ``purity_joint`` the share of the most common combination. Channels with fewer than
  ``min_examples`` labelled prompts get no purity (null).
- **the null** (:mod:`ddr_core.concept_stats`): labels permuted among prompts, i.e. the channel's ``k``
  top prompts a uniformly random ``k``-subset of the capture's labelled prompts. Under it the dominant
  value's count is the maximum of a multivariate hypergeometric draw, computed exactly:
  ``chance_purity_<f>`` its expectation / ``k``, ``p_<f>`` the probability of a purity at least as high
  (exact, so p-values of order 1e-7 resolve), ``q_<f>`` the Benjamini-Hochberg q-value over every
  (channel, family) pair of the variant. A channel is **selective for** ``family=value`` when
  ``q_<f> < alpha`` (default 0.05); ``concept`` lists those, empty for a channel that is not selective.
  ``purity_excess = purity - chance_purity``.
- **agreement** of the channel's priors and dreams: their PNG images are classified by the model's
  concept classifier (:mod:`ddr_core.concept_classifier`); per family, the share of the channel's
  images whose predicted value equals the channel's dominant value (``prior_agreement_<family>``,
  ``dream_agreement_<family>``; null without a dominant value or without images), and the most
  common prediction (``prior_vote_<family>``). Dream images are those of every dreamed timestep.
  ``<source>_agreement_selective`` averages only the families the channel is significantly selective
  for: a colour channel's shape agreement is noise.
  Summary tests (per family over every scored channel, and pooled over the significant channel x family
  pairs): the rate, its **per-image chance** (the share of all the source's images predicted as the
  channel's value), a **channel-label permutation** p-value (values permuted among channels within a
  family; each channel keeps its images) and a bootstrap interval over the units.
- **recognisability** (models that declare a ``world``, e.g. the toy world): each prior / dream image's
  RMSE to the nearest of 4000 renders of the world (:func:`ddr_core.toy_world.nearest_render_rmse`),
  ``<source>_world_rmse`` (median per channel) and ``<source>_recognisable`` (share within
  ``recognisable_rmse``, default 0.15). Concept-blind: it asks whether the picture shows *a* clean shape
  on a background at all, where agreement asks whether it shows the channel's one. The capture's own
  generations are scored alike (``world.generations``), the level a visualisation can reach.

Summary: the purity distribution (mean with a bootstrap interval over channels, median, quartiles, 10/90 %
quantiles; overall, per family, joint, chance, excess), the significance counts (selective channels of
the scored, with an interval, per family and value, the smallest p), the agreement tests per source and
family, counts, dominant-value counts, and ``figures``: the flat higher-is-better numbers the regression
check compares with a committed baseline (:func:`check_against_baseline`).

Outputs in ``out_dir`` (replaced as a whole, :func:`ddr_core.atomic.atomic_dir`):
``feature_concepts.parquet`` (one row per channel, columns :func:`table_columns`) and ``summary.json``.

Raw channels vs SAE features: the field claims SAE features are more monosemantic;
:func:`compare_bases` puts the summaries of a capture group's variants side by side, so whichever way
our data goes is visible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from ddr_core.atomic import atomic_dir, atomic_write_json
from ddr_core.config import PROJECT_ROOT, ConceptLabelsConfig, config_hash
from ddr_core.markdown_text import escape_markdown

LogFn = Callable[[str], None]
FORMAT = "ddr.feature_concepts/1"
TABLE_FILE = "feature_concepts.parquet"
SUMMARY_FILE = "summary.json"
SOURCES: tuple[str, ...] = ("prior", "dream")
QUANTILES: dict[str, float] = {"q10": 0.1, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.9}
DEFAULT_BASELINE_PATH = PROJECT_ROOT / "config" / "feature_concepts_baseline.json"


class FeatureConceptsConfig(BaseModel):
    """Parameters of :func:`compute_feature_concepts`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    examples: Literal["peak_all_generations", "top_peak", "all_timesteps"] = Field(
        "peak_all_generations",
        description="top examples: every generation of the capture ranked at the channel's top activity peak "
                    "(from the activation store), the recorded dataset examples at that peak, or those pooled "
                    "over every timestep; de-duplicated by prompt in every mode")
    n_examples: int | None = Field(
        10, ge=1, description="top prompts kept per channel (distinct prompts, the same for every basis, so "
                              "purities compare); None: all recorded")
    min_examples: int = Field(3, ge=1, description="labelled prompts a channel needs for a purity")
    alpha: float = Field(0.05, gt=0.0, lt=1.0,
                         description="false discovery rate: a (channel, family) is significant when its BH q-value "
                                     "is below this (over every channel x family pair of the variant)")
    permutations: int = Field(10000, ge=100, description="channel-label permutations of the agreement tests")
    bootstrap_resamples: int = Field(2000, ge=100, description="resamples of the bootstrap intervals")
    seed: int = Field(0, ge=0, description="seed of the permutations and bootstrap resamples")
    priors: bool = Field(True, description="classify the priors' images")
    dreams: bool = Field(True, description="classify the dreams' images")
    classifier_batch_size: int = Field(256, ge=1)
    recognisable_rmse: float = Field(
        0.15, gt=0.0, le=1.0, description="an image within this RMSE (0-1 pixels) of one of its world's renders is "
                                          "recognisable (models that declare a `world`)")

    def config_hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Examples and purity
# --------------------------------------------------------------------------------------------------


def _top_peak_timesteps(stats_dir: Path) -> pl.DataFrame:
    """``channel, timestep``: the observed timestep nearest each channel's highest activity peak."""
    return (pl.read_parquet(stats_dir / "activity_peaks.parquet")
            .filter(pl.col("peak_rank") == 0)
            .select(pl.col("channel").cast(pl.Int32), pl.col("observed_timestep").cast(pl.Int64).alias("timestep")))


def peak_activations(store: Any, variant: str, peaks: pl.DataFrame, half: str = "conditional") -> pl.DataFrame:
    """``channel, generation_id, activation, timestep``: every generation's activation of each channel at
    that channel's peak timestep (``peaks``: ``channel, timestep``), read batch by batch from the store."""
    observed = [int(t) for t in store.timesteps()]
    column = {t: i for i, t in enumerate(observed)}
    channels = peaks["channel"].to_numpy().astype(np.int64)
    index = np.asarray([column[int(t)] for t in peaks["timestep"].to_list()], dtype=np.int64)
    parts = []
    for generation_ids, _, activations in store.iter_dense(variant, half):
        values = activations[:, index, channels]  # (g, channels)
        parts.append(pl.DataFrame({
            "channel": np.tile(channels, len(generation_ids)).astype(np.int32),
            "generation_id": np.repeat(generation_ids.astype(np.int64), len(channels)),
            "activation": values.reshape(-1).astype(np.float64),
            "timestep": np.tile(np.asarray(peaks["timestep"].to_list(), dtype=np.int64), len(generation_ids)),
        }))
    schema = {"channel": pl.Int32, "generation_id": pl.Int64, "activation": pl.Float64, "timestep": pl.Int64}
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def top_examples(stats_dir: str | Path, config: FeatureConceptsConfig, store: Any | None = None,
                 variant: str | None = None) -> pl.DataFrame:
    """The top examples of every channel, **one per prompt**: ``channel, rank, generation_id, prompt,
    activation, timestep`` (``rank`` 0-based over distinct prompts; a prompt's best generation stands for
    it; ``timestep`` the examples' timestep for the peak modes, the timestep of the largest activation for
    ``all_timesteps``).

    A capture draws several images per prompt, and their labels are the prompt's: counting a prompt
    once per image would let one prompt fill a channel's top examples, and no null over prompts could
    then be exact. ``peak_all_generations`` (default) ranks every generation of the capture at the
    channel's top peak (``store``: the capture's :class:`~ddr_core.activation_store.ActivationStore`,
    ``variant``); the other modes use the recorded dataset examples (the generations in whose top-k the
    channel was), which may hold only a few distinct prompts.
    """
    stats_dir = Path(stats_dir)
    if config.examples == "peak_all_generations":
        if store is None or variant is None:
            raise ValueError("examples='peak_all_generations' reads the capture's activation store: pass store= "
                             "and variant= (or choose examples='top_peak')")
        prompts = store.read_generations().select(pl.col("generation_id").cast(pl.Int64), "prompt")
        ranked = (peak_activations(store, variant, _top_peak_timesteps(stats_dir))
                  .join(prompts, on="generation_id", how="left")
                  .sort(["channel", "activation", "generation_id"], descending=[False, True, False]))
    elif config.examples == "top_peak":
        examples = pl.read_parquet(stats_dir / "dataset_examples.parquet")
        ranked = (examples.with_columns(pl.col("timestep").cast(pl.Int64), pl.col("channel").cast(pl.Int32))
                  .join(_top_peak_timesteps(stats_dir), on=["channel", "timestep"], how="inner")
                  .sort("channel", "rank"))
    else:
        examples = pl.read_parquet(stats_dir / "dataset_examples.parquet")
        ranked = (examples.sort("channel", "activation", "timestep", descending=[False, True, True])
                  .group_by("channel", "generation_id", maintain_order=True)
                  .agg(pl.len().alias("n_timesteps"), pl.col("activation").first(), pl.col("timestep").first(),
                       pl.col("prompt").first())
                  .sort(["channel", "n_timesteps", "activation", "generation_id"],
                        descending=[False, True, True, False]))
    chosen = (ranked.unique(["channel", "prompt"], keep="first", maintain_order=True)
              .with_columns(pl.int_range(pl.len()).over("channel").alias("rank")))
    if config.n_examples is not None:
        chosen = chosen.filter(pl.col("rank") < config.n_examples)
    return chosen.select(pl.col("channel").cast(pl.Int32), pl.col("rank").cast(pl.Int32),
                         pl.col("generation_id").cast(pl.Int64), "prompt",
                         pl.col("activation").cast(pl.Float64), pl.col("timestep").cast(pl.Int64))


def dominant_value(values: Sequence[str]) -> tuple[str | None, float | None]:
    """The most common value (ties: alphabetically first) and its share; ``(None, None)`` when empty."""
    if not values:
        return None, None
    counts = Counter(values)
    best = min(counts, key=lambda value: (-counts[value], value))
    return best, counts[best] / len(values)


def _joint_values(frame: pl.DataFrame, families: Sequence[str]) -> list[str]:
    return ["|".join(row) for row in frame.select(families).iter_rows()]


def _value_counts(values: Sequence[str]) -> list[int]:
    return sorted(Counter(values).values())


def channel_purity(
    examples: pl.DataFrame,
    labels: pl.DataFrame,
    families: Sequence[str],
    width: int,
    min_examples: int,
    generation_pool: pl.DataFrame | None = None,
    alpha: float = 0.05,
) -> pl.DataFrame:
    """Purity, its exact prompt-level null and significance per channel ``0..width-1`` (module docstring).

    Args:
        examples: :func:`top_examples` rows (``channel``, ``generation_id``, ``prompt``, ...), one per prompt.
        labels: :func:`prompt_labels` (``prompt`` + family columns).
        families: the families scored.
        generation_pool: the capture's generations (a ``prompt`` column): its distinct labelled prompts are
            the population the null draws a channel's prompts from; ``None``: the examples' prompts.
        alpha: the false discovery rate of the per-(channel, family) tests.

    Returns:
        ``channel, n_examples, n_labelled, examples_timestep, purity, purity_joint, chance_purity,
        purity_excess, chance_purity_joint, concept, n_concepts`` and per family ``dominant_<f>, purity_<f>,
        chance_purity_<f>, p_<f>, q_<f>``. ``chance_purity_<f>`` is the exact expected purity of as many
        prompts drawn at random from the pool (labels permuted among prompts), ``p_<f>`` the exact
        probability of a purity at least as high, ``q_<f>`` its Benjamini-Hochberg q-value over every
        (channel, family) pair of the table; ``concept`` lists ``family=value`` of each family with
        ``q_<f> < alpha`` (empty: not selective).
    """
    from ddr_core.concept_stats import benjamini_hochberg, expected_purity, max_count_tail

    families = list(families)
    labelled = examples.join(labels, on="prompt", how="left")
    complete = labelled.drop_nulls(families)
    if generation_pool is None:
        generation_pool = examples.select("prompt")
    pool = generation_pool.select("prompt").unique().join(labels, on="prompt", how="inner").drop_nulls(families)
    pool_counts = {family: _value_counts(pool[family].to_list()) for family in families}
    pool_counts["|joint|"] = _value_counts(_joint_values(pool, families))
    cache: dict[tuple[str, int, int], tuple[float, float]] = {}

    def null(key: str, size: int, observed: int) -> tuple[float, float]:
        """(expected purity, P(purity >= observed / size)) of ``size`` prompts drawn from the pool."""
        if (key, size, observed) not in cache:
            if size > pool.height:
                cache[(key, size, observed)] = (float("nan"), float("nan"))
            else:
                cache[(key, size, observed)] = (expected_purity(pool_counts[key], size),
                                                max_count_tail(pool_counts[key], size, observed))
        return cache[(key, size, observed)]

    per_channel_examples = dict(examples.group_by("channel").agg(pl.len()).iter_rows())
    timesteps = dict(examples.group_by("channel").agg(pl.col("timestep").mode().min()).iter_rows())
    groups = {int(key[0]): frame for key, frame in complete.group_by("channel")}
    rows = []
    for channel in range(width):
        frame = groups.get(channel)
        n_labelled = 0 if frame is None else frame.height
        row: dict[str, Any] = {"channel": channel, "n_examples": int(per_channel_examples.get(channel, 0)),
                               "n_labelled": n_labelled, "examples_timestep": timesteps.get(channel)}
        scored = frame is not None and n_labelled >= min_examples
        purities, chances = [], []
        for family in families:
            value, share = dominant_value(frame[family].to_list()) if scored else (None, None)
            chance, p_value = null(family, n_labelled, round(share * n_labelled)) if scored else (None, None)
            row.update({f"dominant_{family}": value, f"purity_{family}": share, f"chance_purity_{family}": chance,
                        f"p_{family}": p_value})
            if scored:
                purities.append(share)
                chances.append(chance)
        row["purity"] = float(np.mean(purities)) if scored else None
        row["chance_purity"] = float(np.mean(chances)) if scored else None
        row["purity_excess"] = (row["purity"] - row["chance_purity"]
                                if scored and not math.isnan(row["chance_purity"]) else None)
        joint = dominant_value(_joint_values(frame, families))[1] if scored else None
        row["purity_joint"] = joint
        row["chance_purity_joint"] = null("|joint|", n_labelled, round(joint * n_labelled))[0] if scored else None
        rows.append(row)
    # one Benjamini-Hochberg correction over every (channel, family) test of the variant
    p_matrix = np.asarray([[np.nan if r[f"p_{f}"] is None else r[f"p_{f}"] for f in families] for r in rows],
                          dtype=float).reshape(len(rows), len(families))
    q_matrix = benjamini_hochberg(p_matrix.reshape(-1)).reshape(p_matrix.shape)
    for row, q_row in zip(rows, q_matrix, strict=True):
        significant = []
        for family, q in zip(families, q_row, strict=True):
            row[f"q_{family}"] = None if math.isnan(q) else float(q)
            if not math.isnan(q) and q < alpha:
                significant.append(f"{family}={row[f'dominant_{family}']}")
        row["concept"] = ", ".join(significant)
        row["n_concepts"] = len(significant)
    schema: dict[str, Any] = {"channel": pl.Int32, "n_examples": pl.Int32, "n_labelled": pl.Int32,
                              "examples_timestep": pl.Int64}
    for family in families:
        schema.update({f"dominant_{family}": pl.String, f"purity_{family}": pl.Float64,
                       f"chance_purity_{family}": pl.Float64, f"p_{family}": pl.Float64})
    schema.update({"purity": pl.Float64, "chance_purity": pl.Float64, "purity_excess": pl.Float64,
                   "purity_joint": pl.Float64, "chance_purity_joint": pl.Float64})
    schema.update({f"q_{family}": pl.Float64 for family in families})
    schema.update({"concept": pl.String, "n_concepts": pl.Int32})
    return pl.DataFrame(rows, schema=schema, orient="row")


def significant_families(row: dict[str, Any], families: Sequence[str], alpha: float) -> list[str]:
    """The families a :func:`channel_purity` row is significantly selective for (``q_<f> < alpha``)."""
    return [f for f in families if row.get(f"q_{f}") is not None and row[f"q_{f}"] < alpha]


# --------------------------------------------------------------------------------------------------
# Priors and dreams: images and their classification
# --------------------------------------------------------------------------------------------------


def prior_images(priors_dir: str | Path, channels: Sequence[int]) -> list[tuple[int, str]]:
    """``(channel, image path relative to the data root)`` of every finished prior image."""
    from ddr_core.channel_store import read_prior

    images = []
    for channel in channels:
        record = read_prior(priors_dir, channel)
        if record and record.get("status") == "done":
            images += [(int(channel), str(path)) for path in record.get("images") or []]
    return images


def dream_images(dreams_dir: str | Path, channels: Sequence[int]) -> list[tuple[int, str]]:
    """``(channel, image path relative to the data root)`` of every final dream image (all timesteps)."""
    from ddr_core.channel_store import read_dream

    images = []
    for channel in channels:
        record = read_dream(dreams_dir, channel)
        if record is None:
            continue
        for timestep in sorted(record.get("results") or {}, key=int, reverse=True):
            images += [(int(channel), str(p)) for p in record["results"][timestep].get("images") or []]
    return images


def load_images(data_root: str | Path, paths: Sequence[str]) -> list[np.ndarray]:
    """RGB ``(H, W, 3)`` uint8 arrays of PNGs below the data root (a path that escapes it is refused)."""
    from PIL import Image

    from ddr_core.paths import resolve_in_data_root

    arrays = []
    for relative in paths:
        path = resolve_in_data_root(data_root, relative)
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return arrays


def classify_images(classifier: Any, images: Sequence[np.ndarray], families: Sequence[str],
                    batch_size: int = 256) -> dict[str, list[str]]:
    """Predicted label name per family for each image (images of mixed sizes are grouped by size).

    Raises:
        ValueError: the classifier has no head for a family.
    """
    from ddr_core.concept_classifier import predict_concepts

    heads = classifier.config.heads
    missing = [family for family in families if family not in heads]
    if missing:
        raise ValueError(f"the concept classifier has no head for {missing} (heads: {sorted(heads)}); "
                         f"score only the families it reads, or train a classifier with those heads")
    predictions: dict[str, list[str | None]] = {family: [None] * len(images) for family in families}
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            predicted = predict_concepts(classifier, np.stack([images[i] for i in chunk]))
            for family in families:
                for i, label in zip(chunk, predicted[family], strict=True):
                    predictions[family][i] = heads[family][int(label)]
    return predictions  # type: ignore[return-value]


def image_predictions(
    images: Sequence[tuple[int, str]], predictions: dict[str, list[str]], families: Sequence[str]
) -> pl.DataFrame:
    """``channel, image`` + one predicted-label column per family."""
    schema = {"channel": pl.Int32, "image": pl.String, **{f: pl.String for f in families}}
    return pl.DataFrame({"channel": [c for c, _ in images], "image": [p for _, p in images],
                         **{f: predictions[f] for f in families}}, schema=schema)


def channel_agreement(purity: pl.DataFrame, predicted: pl.DataFrame, families: Sequence[str],
                      source: str, alpha: float = 0.05) -> pl.DataFrame:
    """Per channel of ``purity``: ``n_<source>_images`` and per family ``<source>_agreement_<f>`` (share
    of its images predicted as its dominant value; null without images or dominant value) and
    ``<source>_vote_<f>`` (most common prediction), plus ``<source>_agreement`` (mean over families) and
    ``<source>_agreement_selective`` (mean over the families the channel is significantly selective for,
    ``q_<f> < alpha``; null when it has none). A channel that fires on every red shape is not wrong to draw
    a red square when its examples were red circles: its shape agreement is noise, its selective
    agreement is not."""
    groups = {int(key[0]): frame for key, frame in predicted.group_by("channel")}
    rows = []
    columns = ["channel", *[f"dominant_{f}" for f in families], *[f"q_{f}" for f in families]]
    for row in purity.select(columns).iter_rows(named=True):
        frame = groups.get(int(row["channel"]))
        out: dict[str, Any] = {"channel": row["channel"], f"n_{source}_images": 0 if frame is None else frame.height}
        shares, selective = [], []
        for family in families:
            values = [] if frame is None else frame[family].to_list()
            out[f"{source}_vote_{family}"] = dominant_value(values)[0]
            dominant = row[f"dominant_{family}"]
            share = (sum(v == dominant for v in values) / len(values)) if values and dominant is not None else None
            out[f"{source}_agreement_{family}"] = share
            if share is not None:
                shares.append(share)
                if row[f"q_{family}"] is not None and row[f"q_{family}"] < alpha:
                    selective.append(share)
        out[f"{source}_agreement"] = float(np.mean(shares)) if len(shares) == len(families) else None
        out[f"{source}_agreement_selective"] = float(np.mean(selective)) if selective else None
        rows.append(out)
    schema: dict[str, Any] = {"channel": pl.Int32, f"n_{source}_images": pl.Int32}
    for family in families:
        schema[f"{source}_vote_{family}"] = pl.String
        schema[f"{source}_agreement_{family}"] = pl.Float64
    schema[f"{source}_agreement"] = pl.Float64
    schema[f"{source}_agreement_selective"] = pl.Float64
    return pl.DataFrame(rows, schema=schema, orient="row")


def _world_rmse(images: Sequence[np.ndarray], renders_for: Callable[[int], np.ndarray]) -> np.ndarray:
    """Each image's RMSE to the nearest render of the world drawn at the image's (square) size."""
    from ddr_core.toy_world import nearest_render_rmse

    out = np.zeros(len(images))
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    for shape, indices in by_size.items():
        if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
            raise ValueError(f"images of shape {shape} cannot be compared with the world's renders, which are "
                             f"square RGB: generate priors / dreams with height == width")
        out[indices] = nearest_render_rmse(np.stack([images[i] for i in indices]), renders_for(shape[0]))
    return out


def channel_recognisability(predicted: pl.DataFrame, source: str, recognisable_rmse: float) -> pl.DataFrame:
    """Per channel of ``predicted`` (with a ``world_rmse`` column): ``<source>_world_rmse`` (median over its
    images) and ``<source>_recognisable`` (share of its images within ``recognisable_rmse``)."""
    return (predicted.group_by("channel")
            .agg(pl.col("world_rmse").median().alias(f"{source}_world_rmse"),
                 (pl.col("world_rmse") < recognisable_rmse).mean().cast(pl.Float64).alias(f"{source}_recognisable"))
            .with_columns(pl.col("channel").cast(pl.Int32)))


def _recognisability_summary(rmse: np.ndarray, recognisable_rmse: float) -> dict[str, Any]:
    rmse = np.asarray(rmse, dtype=np.float64)
    if rmse.size == 0:
        return {"images": 0, "recognisable": None, "rmse_median": None}
    return {"images": int(rmse.size), "recognisable": float((rmse < recognisable_rmse).mean()),
            "rmse_median": float(np.median(rmse))}


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def distribution(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """``n, mean, std, min, q10, q25, median, q75, q90, max`` of the non-null values (None when empty)."""
    array = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                       dtype=np.float64)
    if array.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, **{k: None for k in QUANTILES}, "max": None}
    return {"n": int(array.size), "mean": float(array.mean()), "std": float(array.std()), "min": float(array.min()),
            **{k: float(np.quantile(array, q)) for k, q in QUANTILES.items()}, "max": float(array.max())}


def _interval(values: Sequence[float], config: FeatureConceptsConfig) -> list[float | None]:
    from ddr_core.concept_stats import bootstrap_interval

    low, high = bootstrap_interval(values, resamples=config.bootstrap_resamples, seed=config.seed)
    return [None if math.isnan(low) else low, None if math.isnan(high) else high]


def _agreement_test(units: list[tuple[list[str], str, str]], reference: dict[str, list[str]],
                    config: FeatureConceptsConfig) -> dict[str, Any]:
    """Rate, per-image chance (over ``reference``: every image of the source, per family), channel-permutation
    p-value and bootstrap interval of (predictions, target, family) units
    (:func:`ddr_core.concept_stats.agreement_permutation_test`)."""
    from ddr_core.concept_stats import agreement_permutation_test

    result = agreement_permutation_test([u[0] for u in units], [u[1] for u in units], strata=[u[2] for u in units],
                                        reference=reference, permutations=config.permutations, seed=config.seed)
    shares = [sum(v == target for v in predicted) / len(predicted) for predicted, target, _ in units if predicted]
    return {"rate": None if math.isnan(result["rate"]) else result["rate"],
            "chance": None if math.isnan(result["chance_per_image"]) else result["chance_per_image"],
            "p_value": None if math.isnan(result["p_value"]) else result["p_value"],
            "interval": _interval(shares, config), "n_units": result["units"], "images": result["images"]}


def summarise(table: pl.DataFrame, families: Sequence[str], sources: Sequence[str],
              config: FeatureConceptsConfig | None = None, world: dict[str, Any] | None = None,
              predictions: dict[str, pl.DataFrame] | None = None) -> dict[str, Any]:
    """The summary of a :func:`compute_feature_concepts` table (see the module docstring).

    ``predictions``: per source, the per-image predictions (``channel`` + one column per family) the
    agreement tests permute; without them the agreement sections carry rates only.
    """
    config = config or FeatureConceptsConfig()
    scored = table.filter(pl.col("purity").is_not_null())
    purity = {
        "overall": {**distribution(scored["purity"].to_list()), "interval": _interval(scored["purity"].to_list(), config)},
        "joint": distribution(scored["purity_joint"].to_list()),
        "chance": distribution(scored["chance_purity"].to_list()),
        "excess": {**distribution(scored["purity_excess"].to_list()),
                   "interval": _interval(scored["purity_excess"].to_list(), config)},
        "chance_joint": distribution(scored["chance_purity_joint"].to_list()),
        "families": {f: distribution(scored[f"purity_{f}"].to_list()) for f in families},
        "chance_families": {f: distribution(scored[f"chance_purity_{f}"].to_list()) for f in families},
    }
    selective = scored.filter(pl.col("n_concepts") > 0)
    significance = {
        "alpha": config.alpha, "tests": int(sum(scored[f"p_{f}"].is_not_null().sum() for f in families)),
        "channels_scored": scored.height, "selective_channels": selective.height,
        "share": selective.height / scored.height if scored.height else None,
        "share_interval": _interval([float(n > 0) for n in scored["n_concepts"].to_list()], config),
        "families": {f: {"channels": int((scored[f"q_{f}"] < config.alpha).sum()),
                         "values": dict(sorted(Counter(scored.filter(pl.col(f"q_{f}") < config.alpha)
                                                       [f"dominant_{f}"].to_list()).items())),
                         "min_p": (float(scored[f"p_{f}"].min()) if scored[f"p_{f}"].is_not_null().any() else None)}
                     for f in families},
    }
    dominant_counts = {f: dict(sorted(Counter(scored[f"dominant_{f}"].to_list()).items())) for f in families}
    agreement: dict[str, Any] = {}
    for source in sources:
        if f"n_{source}_images" not in table.columns:
            continue
        with_images = table.filter((pl.col(f"n_{source}_images") > 0) & pl.col("purity").is_not_null())
        frame = (predictions or {}).get(source)
        images = ({int(key[0]): group for key, group in frame.group_by("channel")} if frame is not None else {})
        reference = {family: frame[family].to_list() for family in families} if frame is not None else {}
        per_family, selective_units = {}, []
        for family in families:
            rates = with_images[f"{source}_agreement_{family}"].drop_nulls()
            units, significant = [], []
            for row in with_images.iter_rows(named=True):
                group = images.get(int(row["channel"]))
                if group is None or row[f"dominant_{family}"] is None:
                    continue
                unit = (group[family].to_list(), row[f"dominant_{family}"], family)
                units.append(unit)
                if row[f"q_{family}"] is not None and row[f"q_{family}"] < config.alpha:
                    significant.append(unit)
            selective_units += significant
            per_family[family] = {"rate": float(rates.mean()) if rates.len() else None,
                                  "n_channels": int(rates.len()),
                                  **({"test": _agreement_test(units, reference, config),
                                      "significant": _agreement_test(significant, reference, config)}
                                     if frame is not None else {})}
            per_family[family]["chance"] = (per_family[family].get("test") or {}).get("chance")
        overall = with_images[f"{source}_agreement"].drop_nulls()
        section: dict[str, Any] = {"families": per_family, "rate": float(overall.mean()) if overall.len() else None,
                                   "n_channels": int(overall.len()),
                                   "images": int(with_images[f"n_{source}_images"].sum() or 0)}
        if frame is not None:
            test = _agreement_test(selective_units, reference, config)
            section["selective"] = {**test, "definition": f"channel x family pairs with q < {config.alpha:g}"}
        agreement[source] = section
    counts = {"channels": table.height, "with_examples": int((table["n_examples"] > 0).sum()),
              "with_purity": scored.height,
              "without_enough_examples": int(((table["n_examples"] > 0) & table["purity"].is_null()).sum())}
    for source in agreement:
        counts[f"with_{source}_images"] = int((table[f"n_{source}_images"] > 0).sum())
    summary = {"counts": counts, "purity": purity, "significance": significance, "agreement": agreement,
               "dominant_counts": dominant_counts,
               "figures": figures_of(purity, agreement, families, world, significance)}
    if world is not None:
        summary["world"] = world
    return summary


def figures_of(purity: dict[str, Any], agreement: dict[str, Any], families: Sequence[str],
               world: dict[str, Any] | None = None, significance: dict[str, Any] | None = None) -> dict[str, float]:
    """The flat, higher-is-better numbers of a summary (what the baseline check compares)."""
    figures: dict[str, float | None] = {
        "purity_mean": purity["overall"]["mean"], "purity_median": purity["overall"]["median"],
        "purity_joint_mean": purity["joint"]["mean"], "purity_excess_mean": purity["excess"]["mean"],
        **{f"purity_{f}_mean": purity["families"][f]["mean"] for f in families},
    }
    if significance is not None:
        figures["selective_share"] = significance["share"]
    for source, section in agreement.items():
        figures[f"{source}_agreement"] = section["rate"]
        figures[f"{source}_agreement_selective"] = (section.get("selective") or {}).get("rate")
        for family, values in section["families"].items():
            figures[f"{source}_agreement_{family}"] = values["rate"]
    for source, values in ((world or {}).get("sources") or {}).items():
        figures[f"{source}_recognisable"] = values["recognisable"]
    return {name: round(float(value), 6) for name, value in figures.items() if value is not None}


def table_columns(families: Sequence[str], sources: Sequence[str] = SOURCES, world: bool = False) -> list[str]:
    """Columns of ``feature_concepts.parquet`` in order (``world``: with the recognisability columns)."""
    columns = ["channel", "basis", "n_examples", "n_labelled", "examples_timestep", "concept", "n_concepts",
               "purity", "chance_purity", "purity_excess", "purity_joint", "chance_purity_joint"]
    for family in families:
        columns += [f"dominant_{family}", f"purity_{family}", f"chance_purity_{family}", f"p_{family}",
                    f"q_{family}"]
    for source in sources:
        columns += [f"n_{source}_images", f"{source}_agreement", f"{source}_agreement_selective"]
        if world:
            columns += [f"{source}_world_rmse", f"{source}_recognisable"]
        for family in families:
            columns += [f"{source}_agreement_{family}", f"{source}_vote_{family}"]
    return columns


@dataclass
class FeatureConceptsResult:
    table: pl.DataFrame
    summary: dict[str, Any]
    out_dir: Path


def compute_feature_concepts(
    stats_dir: str | Path,
    labels: pl.DataFrame,
    families: Sequence[str],
    out_dir: str | Path,
    *,
    variant: str,
    basis: str,
    config: FeatureConceptsConfig | None = None,
    data_root: str | Path | None = None,
    priors_dir: str | Path | None = None,
    dreams_dir: str | Path | None = None,
    classifier: Any | None = None,
    generation_pool: pl.DataFrame | None = None,
    world_renders: Callable[[int], np.ndarray] | None = None,
    generation_images: Sequence[np.ndarray] | None = None,
    store: Any | None = None,
    log: LogFn | None = None,
) -> FeatureConceptsResult:
    """Score every channel of one variant and write ``feature_concepts.parquet`` + ``summary.json``.

    Args:
        stats_dir: the variant's finished timestep statistics (its ``summary.json`` gives the width).
        labels: :func:`prompt_labels` of the prompt dataset.
        families: concept families scored (columns of ``labels``).
        out_dir: output folder (replaced as a whole).
        variant, basis: recorded in the table and summary (``raw`` / ``sae``).
        data_root: what the image paths of priors and dreams are relative to (needed with them).
        priors_dir, dreams_dir: the variant's priors / dreams folders (missing or ``None``: skipped).
        classifier: a :class:`~ddr_core.concept_classifier.ConceptClassifier`; ``None``: no agreement.
        generation_pool: the capture's generations (``prompt`` column) for the chance purity.
        world_renders: image side -> ``(m, side, side, 3)`` uint8 renders of the model's world
            (:func:`ddr_core.toy_world.reference_renders`): each classified image also gets its RMSE to
            the nearest render, and a channel the share of its images within ``recognisable_rmse``.
        generation_images: the capture's generated images, scored the same way as a reference (what the
            model draws when prompted).
        store: the capture's activation store (``examples="peak_all_generations"`` ranks its generations).
    """
    from ddr_core.statistics import read_summary

    config = config or FeatureConceptsConfig()
    say = log or (lambda _message: None)
    families = list(families)
    missing = [f for f in families if f not in labels.columns]
    if missing:
        raise ValueError(f"the prompt labels have no column for {missing}; columns: {labels.columns}")
    stats_summary = read_summary(stats_dir)
    width = int(stats_summary["width"])
    examples = top_examples(stats_dir, config, store=store, variant=variant)
    table = channel_purity(examples, labels, families, width, config.min_examples, generation_pool, config.alpha)
    unlabelled = examples.join(labels.drop_nulls(families), on="prompt", how="anti")
    say(f"feature concepts {variant}: {table['purity'].is_not_null().sum()} of {width} channels scored "
        f"from {examples.height} examples ({unlabelled.height} without labels)")
    sources: list[str] = []
    predictions_kept: dict[str, pl.DataFrame] = {}
    if classifier is not None:
        channels = list(range(width))
        wanted = {"prior": (config.priors, priors_dir, prior_images),
                  "dream": (config.dreams, dreams_dir, dream_images)}
        for source, (enabled, folder, finder) in wanted.items():
            if not enabled or folder is None:
                continue
            if data_root is None:
                raise ValueError("data_root is needed to read prior and dream images")
            images = finder(folder, channels) if Path(folder).is_dir() else []
            loaded = load_images(data_root, [p for _, p in images])
            predicted = classify_images(classifier, loaded, families,
                                        config.classifier_batch_size) if images else {f: [] for f in families}
            frame = image_predictions(images, predicted, families)
            if world_renders is not None:
                frame = frame.with_columns(pl.Series("world_rmse", _world_rmse(loaded, world_renders),
                                                     dtype=pl.Float64))
                table = table.join(channel_recognisability(frame, source, config.recognisable_rmse),
                                   on="channel", how="left")
            predictions_kept[source] = frame
            table = table.join(channel_agreement(table, frame, families, source, config.alpha),
                               on="channel", how="left")
            sources.append(source)
            say(f"feature concepts {variant}: {len(images)} {source} image(s) classified")
    table = table.with_columns(pl.lit(basis).alias("basis"))
    table = table.select(table_columns(families, sources, world=world_renders is not None and classifier is not None))
    world = None
    if world_renders is not None:
        world = {"recognisable_rmse": config.recognisable_rmse,
                 "sources": {source: _recognisability_summary(predictions_kept[source]["world_rmse"].to_numpy(),
                                                              config.recognisable_rmse)
                             for source in sources if "world_rmse" in predictions_kept[source].columns}}
        if generation_images:
            world["generations"] = _recognisability_summary(_world_rmse(list(generation_images), world_renders),
                                                            config.recognisable_rmse)
    summary = {
        "format": FORMAT, "variant": variant, "basis": basis, "families": families, "width": width,
        "config": config.model_dump(mode="json"), "config_hash": config.config_hash(),
        "stats_config_hash": stats_summary.get("config_hash"), "sources": sources,
        "classifier": classifier is not None, "unlabelled_examples": unlabelled.height,
        **summarise(table, families, sources, config, world, predictions_kept),
    }
    out = Path(out_dir)
    with atomic_dir(out) as staging:
        table.write_parquet(staging / TABLE_FILE)
        for source, frame in predictions_kept.items():
            frame.write_parquet(staging / f"{source}_predictions.parquet")
        atomic_write_json(staging / SUMMARY_FILE, summary)
    return FeatureConceptsResult(table=table, summary=summary, out_dir=out)


def read_feature_concepts(out_dir: str | Path) -> tuple[pl.DataFrame, dict[str, Any]] | None:
    """``(table, summary)`` of a finished output folder, or ``None`` when there is none."""
    out = Path(out_dir)
    if not (out / SUMMARY_FILE).is_file() or not (out / TABLE_FILE).is_file():
        return None
    return pl.read_parquet(out / TABLE_FILE), json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# Raw vs SAE, and the regression check
# --------------------------------------------------------------------------------------------------


def compare_bases(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (e.g. a capture group's raw and SAE variants): basis, scored channels and the
    purity distribution next to its chance level, and the agreement rates."""
    rows = []
    for variant, summary in summaries.items():
        overall, chance = summary["purity"]["overall"], summary["purity"]["chance"]
        row: dict[str, Any] = {"variant": variant, "basis": summary["basis"], "scored": overall["n"],
                               "purity_mean": overall["mean"], "purity_median": overall["median"],
                               "purity_q25": overall["q25"], "purity_q75": overall["q75"],
                               "chance_mean": chance["mean"],
                               "excess_mean": (summary["purity"].get("excess") or {}).get("mean"),
                               "purity_joint_mean": summary["purity"]["joint"]["mean"]}
        for source in SOURCES:
            section = summary.get("agreement", {}).get(source) or {}
            row[f"{source}_agreement"] = section.get("rate")
            row[f"{source}_agreement_selective"] = (section.get("selective") or {}).get("rate")
            row[f"{source}_recognisable"] = (((summary.get("world") or {}).get("sources") or {}).get(source)
                                             or {}).get("recognisable")
        rows.append(row)
    return rows


def basis_gap(raw: pl.DataFrame, sae: pl.DataFrame, *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """SAE features minus raw channels of one capture group: the mean purity, purity excess and share of
    selective channels, each with a 95% bootstrap interval (channels resampled within each basis).

    The claim SAEs are made for is that their features are purer than raw channels: it holds on this data
    when an interval lies above 0."""
    from ddr_core.concept_stats import bootstrap_difference

    out: dict[str, Any] = {}
    for name, column in (("purity", "purity"), ("purity_excess", "purity_excess"), ("selective_share", "n_concepts")):
        a = sae[column].drop_nulls().cast(pl.Float64).to_list() if column in sae.columns else []
        b = raw[column].drop_nulls().cast(pl.Float64).to_list() if column in raw.columns else []
        if column == "n_concepts":
            a = [float(v > 0) for v in sae.filter(pl.col("purity").is_not_null())[column].to_list()]
            b = [float(v > 0) for v in raw.filter(pl.col("purity").is_not_null())[column].to_list()]
        if not a or not b:
            continue
        low, high = bootstrap_difference(a, b, resamples=resamples, seed=seed)
        out[name] = {"sae": float(np.mean(a)), "raw": float(np.mean(b)), "gap": float(np.mean(a) - np.mean(b)),
                     "interval": [None if math.isnan(low) else low, None if math.isnan(high) else high]}
    return out


def load_baseline(path: str | Path | None = None) -> dict[str, Any]:
    """The committed baseline (``{"tolerance": t, "tolerances": {...}, "variants": {v: {figure: value}}}``).

    Raises:
        FileNotFoundError / ValueError: naming the file and what is wrong.
    """
    path = Path(path) if path is not None else DEFAULT_BASELINE_PATH
    if not path.is_file():
        raise FileNotFoundError(f"feature-concepts baseline {path} does not exist; write one with "
                                f"`python -m ddr_core.feature_concepts baseline --summary <summary.json> --out {path}`")
    from ddr_core.json_input import read_json_file

    data = read_json_file(path, "fix the file by hand or rewrite it with `python -m ddr_core.feature_concepts "
                                "baseline --summary <summary.json> --out <this file>`")
    if not isinstance(data, dict) or not isinstance(data.get("variants", {}), dict):
        raise ValueError(f"{path}: expected an object with a 'variants' mapping")
    return data


def check_against_baseline(figures: dict[str, float], baseline: dict[str, Any], variant: str,
                           tolerance: float | None = None) -> dict[str, Any]:
    """Compare a variant's figures with its baseline entry: a figure regressed when it is more than the
    tolerance below the baseline (all figures are higher-is-better), or missing now.

    Tolerance: ``tolerance`` if given, else the baseline's ``tolerances[figure]``, else its
    ``tolerance`` (default 0.05).

    Returns:
        ``{"passed", "description", "regressions": [{"figure", "baseline", "value", "tolerance"}],
        "compared": {figure: {"baseline", "value", "delta"}}, "has_baseline"}``. No entry for the variant
        passes (nothing to regress against) and says so.
    """
    entry = (baseline.get("variants") or {}).get(variant)
    if not entry:
        return {"passed": True, "has_baseline": False, "regressions": [], "compared": {},
                "description": f"no baseline for {variant!r} yet: record one with `python -m "
                               f"ddr_core.feature_concepts baseline` once the numbers are trusted"}
    regressions, compared = [], {}
    for figure, expected in sorted(entry.items()):
        allowed = (tolerance if tolerance is not None
                   else (baseline.get("tolerances") or {}).get(figure, baseline.get("tolerance", 0.05)))
        value = figures.get(figure)
        compared[figure] = {"baseline": expected, "value": value,
                            "delta": None if value is None else round(value - expected, 6)}
        if value is None or value < expected - allowed:
            regressions.append({"figure": figure, "baseline": expected, "value": value, "tolerance": allowed})
    if regressions:
        description = "regressed: " + "; ".join(
            f"{r['figure']} " + ("missing" if r["value"] is None else f"{r['value']:.4f}")
            + f" < baseline {r['baseline']:.4f} - {r['tolerance']}" for r in regressions)
    else:
        description = f"{len(compared)} figure(s) within tolerance of the baseline"
    return {"passed": not regressions, "has_baseline": True, "regressions": regressions, "compared": compared,
            "description": description}


def baseline_entry(summary: dict[str, Any], figures: Sequence[str] | None = None) -> dict[str, float]:
    """The figures of a summary to commit as its variant's baseline (all, or the named ones)."""
    chosen = summary["figures"] if figures is None else {k: summary["figures"][k] for k in figures}
    return {k: round(float(v), 4) for k, v in sorted(chosen.items())}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A small markdown table (floats to 3 decimals, None as a dash).

    Column names and every other cell (variant names, concept labels: data) go through
    :func:`~ddr_core.markdown_text.escape_markdown`, so they show as text, never as links or images.
    """
    if not rows:
        return "_(none)_"
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        return escape_markdown(value)

    lines = ["| " + " | ".join(escape_markdown(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The stage: one variant of the project configuration
# --------------------------------------------------------------------------------------------------


def feature_concepts_dir(layout: Any, variant: str) -> Path:
    return layout.stage_dir("feature_concepts", variant)


def feature_concepts_for_variant(project: Any, layout: Any, variant: str,
                                 config: FeatureConceptsConfig | None = None,
                                 log: LogFn | None = None, out_dir: str | Path | None = None) -> FeatureConceptsResult:
    """Score one variant of the project config from its timestep statistics, priors and dreams.

    Reads the prompt dataset's labels (``prompt_datasets.<p>.labels``), the capture's generations (for
    the chance purity), and, when the model declares a ``concept_classifier``, classifies the images
    of ``priors/<variant>`` and ``dreams/<variant>``; when it declares a ``world``, measures how close those
images (and the capture's generations, as the reference) come to the world's renders. Writes
``feature_concepts/<variant>/`` (or ``out_dir``).

    Raises:
        ValueError: the variant's prompt dataset has no labels (names the config field to add).
        FileNotFoundError: the timestep statistics or the classifier are missing (names what to run).
    """
    from ddr_core.activation_store import ActivationStore
    from ddr_core.paths import file_inside
    from ddr_core.statistics import read_summary

    if variant not in project.variants:
        raise KeyError(f"unknown variant {variant!r}; declared: {sorted(project.variants)}")
    spec = project.variants[variant]
    dataset = project.prompt_datasets[spec.prompts]
    if dataset.labels is None:
        raise ValueError(f"variant {variant!r}: prompt dataset {spec.prompts!r} declares no concept labels; add "
                         f"`labels: {{families: [...]}}` under prompt_datasets.{spec.prompts} in the project config")
    stats_dir = layout.timestep_stats_dir(variant)
    try:
        read_summary(stats_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"the timestep statistics of variant {variant!r} are missing ({error}): "
                                f"materialize timestep_stats[{variant}] first") from None
    layout.check_output_folder(feature_concepts_dir(layout, variant), "feature_concepts folder")  # no link
    labels = prompt_labels(file_inside(layout.prompts_dir(spec.prompts), dataset.file,
                                       f"prompt_datasets.{spec.prompts}.file"), dataset.labels, dataset.text_field)
    store = ActivationStore(layout.activations_dir(project.capture_of(variant)))
    generations = store.read_generations() if store.root.is_dir() else None
    pool = generations.select("prompt") if generations is not None else None
    classifier = None
    model = project.models[spec.model]
    world_renders, generation_images = None, None
    if model.world == "toy-world":
        import functools

        from ddr_core.toy_world import ToyWorldConfig, reference_renders

        world_renders = functools.lru_cache(maxsize=4)(
            lambda side: reference_renders(config=ToyWorldConfig(image_size=side)))
        if generations is not None and "image_path" in generations.columns:
            paths = [p for p in generations["image_path"].to_list() if p]
            generation_images = load_images(layout.data_root, paths) if paths else None
    if model.concept_classifier:
        from ddr_core.concept_classifier import CONFIG_FILENAME, WEIGHTS_FILENAME, load_concept_classifier
        from ddr_core.pipeline import check_provisioned_model

        field = f"models.{spec.model}.concept_classifier"
        model_dir = layout.model_dir(spec.model)
        check_provisioned_model(model_dir)  # the classifier's files were provisioned with the model: unchanged?
        for name in (CONFIG_FILENAME, WEIGHTS_FILENAME):  # no link out of the model folder, at any level
            file_inside(model_dir, f"{model.concept_classifier.rstrip('/')}/{name}", field)
        classifier = load_concept_classifier(file_inside(model_dir, model.concept_classifier, field))
    elif log:
        log(f"model {spec.model!r} declares no concept_classifier: prior / dream agreement is skipped")
    if generations is None and (config or FeatureConceptsConfig()).examples == "peak_all_generations":
        raise FileNotFoundError(f"the capture of variant {variant!r} ({store.root}) is missing: its generations are "
                                f"ranked for the top examples; materialize activations[{project.capture_of(variant)}] "
                                f"first (or score the recorded examples: examples='top_peak')")
    return compute_feature_concepts(
        stats_dir, labels, dataset.labels.families, out_dir or feature_concepts_dir(layout, variant), variant=variant,
        basis=spec.basis, config=config, data_root=layout.data_root,
        priors_dir=layout.stage_dir("priors", variant), dreams_dir=layout.stage_dir("dreams", variant),
        classifier=classifier, generation_pool=pool if pool is not None and pool.height else None,
        world_renders=world_renders, generation_images=generation_images,
        store=store if generations is not None else None, log=log)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ground-truth concept scores of features (toy world).")
    commands = parser.add_subparsers(dest="command", required=True)
    prompts = commands.add_parser("write-prompts", help="write a labelled prompt JSONL of a parser's world")
    prompts.add_argument("--parser", default="toy-world", choices=sorted(LABEL_PARSER_FACTORIES))
    prompts.add_argument("--out", required=True)
    score = commands.add_parser("score", help="score a variant of the project config")
    score.add_argument("--variant", required=True)
    score.add_argument("--data-root", default=None)
    score.add_argument("--experiment", default=None)
    baseline = commands.add_parser("baseline", help="record a summary's figures as its variant's baseline")
    baseline.add_argument("--summary", required=True, nargs="+", help="feature_concepts/<variant>/summary.json")
    baseline.add_argument("--out", default=str(DEFAULT_BASELINE_PATH))
    baseline.add_argument("--tolerance", type=float, default=None)
    args = parser.parse_args(argv)
    if args.command == "write-prompts":
        world = label_parser(args.parser)
        path = write_labelled_prompts(args.out, world.prompts(), args.parser)
        print(f"{len(world.prompts())} labelled prompts written to {path}")
    elif args.command == "score":
        from ddr_core.config import data_root, load_project_config
        from ddr_core.paths import DataLayout

        project = load_project_config()
        layout = DataLayout(args.data_root or data_root(), args.experiment or project.experiment)
        result = feature_concepts_for_variant(project, layout, args.variant, log=print)
        print(json.dumps({k: result.summary[k] for k in ("counts", "figures")}, indent=2))
    else:
        out = Path(args.out)
        current = load_baseline(out) if out.is_file() else {
            "description": "Committed feature_concepts figures; the asset check fails when one drops by more "
                           "than the tolerance.", "tolerance": 0.05, "variants": {}}
        if args.tolerance is not None:
            current["tolerance"] = args.tolerance
        for path in args.summary:
            summary = json.loads(Path(path).read_text(encoding="utf-8"))
            current.setdefault("variants", {})[summary["variant"]] = baseline_entry(summary)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"baseline for {sorted(current['variants'])} written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
