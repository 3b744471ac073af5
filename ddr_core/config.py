"""Project configuration: models, SAEs, prompt datasets and the variants analysed.

The configuration is one YAML file (``config/ddr.yaml`` by default, or the file named by ``DDR_CONFIG``).
It is parsed into explicit pydantic objects; every validation error names the offending field and file.

Vocabulary:

- a **model** is a diffusers folder of a supported family (:mod:`ddr_core.families`), provisioned from a *source*;
- an **SAE** is a SAeUron-format sparse autoencoder for one layer of a model;
- a **prompt dataset** is a JSONL (``text`` field) or text file of prompts; it may declare ground-truth
  concept ``labels`` of its prompts (JSONL fields, or a parser of the prompt text), which enables the
  ``feature_concepts`` scores of its variants;
- a **variant** is model + target layer + basis (raw channels or one SAE) + prompt dataset;
  every per-channel stage is partitioned by variant;
- a **capture group** is the set of variants sharing model, layer and prompts: one generation pass
  records all of them at once (no generation is repeated per variant).

Why one module over 600 lines: it is the schema of one file. Every config model sits here in the order the
YAML reads (sources, models, SAEs, prompt datasets, variants, the project) next to the loader that reports a
field's dotted path and line, so a reader checks the schema against ``config/ddr.yaml`` in one place.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddr_core.comparisons import ComparisonConfig, check_comparisons, parse_comparison_name
from ddr_core.paths import UnsafePathError, check_name, check_relative_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "ddr.yaml"
DEFAULT_DATA_ROOT = PROJECT_ROOT / "data"
DEFAULT_LAYER = "up_blocks.1.attentions.1"

OVERRIDE_STAGES: tuple[str, ...] = ("timestep_stats", "priors", "dreams")
"""Stages whose parameters a variant may override (``variants.<v>.overrides.<stage>``)."""

OVERRIDE_MODELS: dict[str, str] = {"timestep_stats": "ddr_core.statistics:TimestepStatsConfig",
                                   "priors": "ddr_core.priors:PriorsConfig", "dreams": "ddr_core.dreams:DreamConfig"}
"""The config model of each override stage (``module:class``), imported when a variant overrides that stage
(both modules import torch, as every caller of :func:`load_project_config` does anyway)."""

MAX_CONFIG_BYTES = 1 << 20
"""Largest configuration file read (the shipped one is a few KiB)."""

MAX_CONFIG_VALUES = 100_000
"""Most YAML values (mapping entries and list items, counted through aliases) in a configuration: a file of
nested aliases ("billion laughs") expands to more than this and is refused before anything walks it."""

MAX_CHANNEL_BLOCKS = 10_000
"""Most channel-range partitions (``width / block_size``) of one variant."""


class ConfigError(ValueError):
    """The project configuration is invalid; the message names the field and the file."""


class _Strict(BaseModel):
    # strict: YAML gives native types, so `width: true`, `width: "64"` or `width: 64.5` are mistakes, not values
    # to coerce (pydantic's lax mode reads true as 1 and "64" as 64).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _not_blank(value: str | None, what: str) -> str | None:
    if value is not None and not value.strip():
        raise ValueError(f"{what} is empty; give a value or leave the field out")
    return value


class HubSourceConfig(_Strict):
    repo_id: str
    revision: str = "main"
    allow_patterns: list[str] | None = None
    repo_type: Literal["model", "dataset"] = "model"

    @field_validator("repo_id", "revision")
    @classmethod
    def _given(cls, value: str, info: Any) -> str:
        return _not_blank(value, info.field_name)  # type: ignore[return-value]

    @field_validator("repo_id")
    @classmethod
    def _repo_id_shape(cls, value: str) -> str:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(value)  # it becomes part of every hub URL: nothing that changes the URL's shape
        except HFValidationError:
            raise ValueError(f"repo_id {value!r} is not a hub repo id; expected 'owner/name' (letters, digits, "
                             "'-', '_', '.'; no '--' or '..'), as in the repo's URL on the hub") from None
        return value

    @field_validator("allow_patterns")
    @classmethod
    def _patterns_given(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("allow_patterns is an empty list (nothing would be downloaded); list the file "
                                 "patterns to fetch, or leave the field out to fetch every file")
            for index, pattern in enumerate(value):
                _not_blank(pattern, f"allow_patterns[{index}]")
        return value


class GoogleDriveSourceConfig(_Strict):
    file_id: str | None = None
    folder_id: str | None = None
    filename: str | None = None

    @field_validator("filename")
    @classmethod
    def _filename_inside(cls, value: str | None) -> str | None:
        return _relative_inside(value, "filename")

    @field_validator("file_id", "folder_id")
    @classmethod
    def _id_given(cls, value: str | None, info: Any) -> str | None:
        return _not_blank(value, info.field_name)

    @model_validator(mode="after")
    def _one_id(self) -> GoogleDriveSourceConfig:
        if (self.file_id is None) == (self.folder_id is None):
            raise ValueError("gdrive source needs exactly one of `file_id` or `folder_id`")
        return self


class SourceConfig(_Strict):
    """Where an asset comes from: exactly one of ``builtin``, ``hub``, ``gdrive`` or ``local``.

    A relative ``local`` path is taken relative to the project root (the repository holding
    ``ddr_core``), whatever the working directory; ``~`` is expanded.
    """

    builtin: str | None = Field(None, description="an embedded asset built locally (ddr_core.builtins.BUILTINS)")
    hub: HubSourceConfig | None = None
    gdrive: GoogleDriveSourceConfig | None = None
    local: str | None = None

    @field_validator("builtin")
    @classmethod
    def _known_builtin(cls, value: str | None) -> str | None:
        from ddr_core.builtins import check_builtin

        return None if value is None else check_builtin(value)

    @field_validator("local")
    @classmethod
    def _anchor_local(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("local: give a file or folder path")
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else PROJECT_ROOT / path)

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceConfig:
        given = [k for k in ("builtin", "hub", "gdrive", "local") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a source needs exactly one of builtin/hub/gdrive/local, got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("builtin", "hub", "gdrive", "local") if getattr(self, k) is not None)

    def describe(self) -> str:
        if self.builtin:
            return f"builtin:{self.builtin}"
        if self.hub:
            return f"hub:{self.hub.repo_id}@{self.hub.revision}"
        if self.gdrive:
            return f"gdrive:{self.gdrive.file_id or self.gdrive.folder_id}"
        return f"local:{self.local}"


def _relative_inside(value: str | None, what: str) -> str | None:
    """A file / folder named inside a provisioned folder (:func:`ddr_core.paths.check_relative_file`)."""
    if value is None:
        return None
    try:
        return check_relative_file(value, what)
    except UnsafePathError as exc:
        raise ValueError(str(exc)) from None


def _name(value: str | None, what: str) -> str | None:
    """A name that becomes a folder name or partition key (:func:`ddr_core.paths.check_name`)."""
    if value is None:
        return None
    try:
        return check_name(value, what)
    except UnsafePathError as exc:
        raise ValueError(str(exc)) from None


def override_model(stage: str) -> type[BaseModel]:
    """The config model whose fields ``variants.<v>.overrides.<stage>`` may set (:data:`OVERRIDE_MODELS`)."""
    module, name = OVERRIDE_MODELS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def nearest(name: str, choices: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a misspelt ``name`` (difflib), or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def override_problems(stage: str, values: dict[str, Any]) -> list[str]:
    """What is wrong with the override values of one stage, each as ``<stage>.<field>: <problem and fix>``.

    Every field must be a parameter of the stage's config model and its value valid for it, judged strictly
    (no ``"0.5"`` for a number, no ``1`` for a boolean) as a run that sets nothing else would use it. Rules
    between fields (e.g. enough seeds for ``n_results``) are left to the run, whose config may set the others.
    """
    model = override_model(stage)
    problems = [f"{stage}.{name}: {stage} has no parameter {name!r}{nearest(name, model.model_fields)}; "
                f"its parameters: {sorted(model.model_fields)}"
                for name in values if name not in model.model_fields]
    if problems:
        return problems
    try:
        model.model_validate(values, strict=True)
    except ValidationError as exc:
        for error in exc.errors():
            if error["loc"]:  # a field's own value; loc () is a rule between fields, checked at run time
                where = ".".join(str(part) for part in error["loc"])
                problems.append(f"{stage}.{where}: {error['msg'].removeprefix('Value error, ')}"
                                f"{_got(error)}")
    return problems


def _got(error: Any) -> str:
    """`` (got true, a bool; write a whole number)`` for a type error, else ``""``."""
    hint = _TYPE_HINTS.get(error["type"])
    if hint is None:
        return ""
    value = error.get("input")
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    kind = type(value).__name__
    return f" (got {shown}, {'an' if kind[0] in 'aeiou' else 'a'} {kind}; {hint})"


_TYPE_HINTS = {
    "int_type": "write a whole number without quotes, e.g. 64",
    "float_type": "write a number without quotes, e.g. 0.5",
    "bool_type": "write true or false without quotes",
    "string_type": "write text; quote it if YAML reads it as a number, date or boolean",
    "list_type": "write a list, e.g. [a, b]",
    "dict_type": "write a mapping of `key: value` lines",
    "model_type": "write a mapping of `key: value` lines",
}


class ModelConfig(_Strict):
    source: SourceConfig
    default_layer: str = DEFAULT_LAYER
    description: str = ""
    concept_classifier: str | None = Field(
        default=None,
        description="folder inside the provisioned model folder holding a concept classifier "
                    "(classifier_config.json + classifier.safetensors) that judges the model's images; "
                    "enables the prior / dream agreement of feature_concepts",
    )

    labeller: str | None = Field(
        default=None,
        description="the `labellers` entry that names this model's channels / SAE features (feature_labels); "
                    "unset: no automatic labels",
    )

    world: Literal["toy-world", "toy-world-rich", "toy-world-no-yellow"] | None = Field(
        default=None,
        description="the synthetic world the model was trained on (`toy-world`, `toy-world-rich`: "
                    "docs/TOY_WORLD.md, or `toy-world-no-yellow`: docs/MATCHING.md): feature_concepts also measures "
                    "how far each prior / dream image is from the nearest of the world's renders (recognisability)",
    )

    @field_validator("concept_classifier")
    @classmethod
    def _classifier_inside(cls, value: str | None) -> str | None:
        return _relative_inside(value, "concept_classifier")

    @field_validator("default_layer")
    @classmethod
    def _layer_name(cls, value: str) -> str:
        return _name(value, "default_layer")  # an SAE folder is named after the layer (unet.<layer>)


class SaeSourceConfig(_Strict):
    source: SourceConfig
    description: str = ""


LABEL_PARSERS: dict[str, tuple[str, ...]] = {"toy-world": ("colour", "shape", "background")}
"""Prompt-text parsers of concept labels -> the concept families each one gives
(implemented in :mod:`ddr_core.feature_concepts`; ``toy-world`` is :func:`ddr_core.toy_world.parse_prompt`)."""


class ConceptLabelsConfig(_Strict):
    """Ground-truth concept labels of a prompt dataset's prompts.

    ``families`` are the concept families scored (e.g. ``[colour, shape]``). Without ``parser`` each JSONL
    line carries one field per family (``{"text": ..., "colour": "red", "shape": "circle"}``); with a
    ``parser`` the labels are read off the prompt text.
    """

    families: list[str] = Field(min_length=1, description="concept families scored, e.g. [colour, shape]")
    parser: Literal["toy-world"] | None = Field(
        default=None, description="derive the labels from the prompt text; unset: JSONL fields named after the families")

    @model_validator(mode="after")
    def _families_known(self) -> ConceptLabelsConfig:
        for index, family in enumerate(self.families):
            _not_blank(family, f"families[{index}]")
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families repeat: {self.families}")
        if self.parser is not None:
            unknown = sorted(set(self.families) - set(LABEL_PARSERS[self.parser]))
            if unknown:
                raise ValueError(f"parser {self.parser!r} gives the families {list(LABEL_PARSERS[self.parser])}, "
                                 f"not {unknown}")
        return self


LABELLER_KINDS = ("concept-classifier", "clip")
"""Kinds of automatic labeller (one module each in :mod:`ddr_core.labels`)."""
MAX_VOCABULARY_ENTRY = 100


class LabellerConfig(_Strict):
    """An automatic labeller of features (:mod:`ddr_core.labels`): ``concept-classifier`` (the model's own concept
    classifier, toy world) or ``clip`` (zero-shot CLIP over a candidate ``vocabulary``, weights from ``source``,
    provisioned like a model)."""

    kind: Literal["concept-classifier", "clip"]
    description: str = ""
    source: SourceConfig | None = Field(default=None, description="clip: where its weights come from")
    vocabulary: list[str] = Field(default_factory=list, description="clip: the candidate labels (2 or more)")
    top_k: int = Field(1, ge=1, description="clip: an image shows the label when it is among its top_k most probable "
                                            "vocabulary entries")

    @model_validator(mode="after")
    def _fits_kind(self) -> LabellerConfig:
        if self.kind == "clip":
            if self.source is None:
                raise ValueError("a clip labeller needs `source:` (its weights, e.g. a hub repo)")
            if len(self.vocabulary) < 2:
                raise ValueError("a clip labeller needs a `vocabulary:` of 2 or more candidate labels")
            if self.top_k >= len(self.vocabulary):
                raise ValueError(f"top_k {self.top_k} would accept every vocabulary entry; give a top_k below "
                                 f"{len(self.vocabulary)}")
        elif self.source is not None or self.vocabulary or self.top_k != 1:
            raise ValueError("a concept-classifier labeller uses the model's own classifier: leave out `source:` "
                             "`vocabulary:` and `top_k:`")
        from ddr_core.prompts import text_problem

        for index, entry in enumerate(self.vocabulary):
            problem = text_problem(entry)
            if problem is None and (not entry.strip() or entry != entry.strip()):
                problem = "is empty or has leading / trailing spaces"
            if problem is None and len(entry) > MAX_VOCABULARY_ENTRY:
                problem = f"is longer than {MAX_VOCABULARY_ENTRY} characters"
            if problem is not None:
                raise ValueError(f"vocabulary[{index}] {entry[:40]!r}: {problem}; write a short plain phrase")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError(f"vocabulary repeats an entry: {self.vocabulary}")
        return self


class PromptDatasetConfig(_Strict):
    source: SourceConfig
    file: str = "prompts.jsonl"
    text_field: str = "text"
    description: str = ""
    labels: ConceptLabelsConfig | None = Field(default=None, description="ground-truth concept labels of the prompts")

    @field_validator("file")
    @classmethod
    def _file_inside(cls, value: str) -> str:
        return _relative_inside(value, "file")

    @field_validator("text_field")
    @classmethod
    def _text_field_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text_field is empty; name the JSON field holding each prompt, e.g. text")
        return value

    @model_validator(mode="after")
    def _label_fields_need_jsonl(self) -> PromptDatasetConfig:
        if self.labels is not None and self.labels.parser is None and self.text_field in self.labels.families:
            raise ValueError(f"labels.families includes the text field {self.text_field!r}: a label family is "
                             f"its own JSONL field beside the prompt; rename the family or the text_field")
        if self.labels is not None and self.labels.parser is None and not self.file.lower().endswith(
                (".jsonl", ".ndjson")):
            raise ValueError(f"labels without a parser are read from JSONL fields, but file {self.file!r} is not "
                             f"JSONL; use a .jsonl file or set labels.parser")
        return self


class VariantConfig(_Strict):
    """One analysed basis of one layer of one model."""

    model: str
    prompts: str
    basis: str = Field(
        default="raw", description="raw layer channels, a SAeUron-format SAE (sae) or an sdxl-unbox SAE (sdxl-unbox): "
                                   "a kind of ddr_core.basis.BASES")
    sae: str | None = None
    layer: str | None = Field(default=None, description="dotted UNet module name; default: the model's")
    hook: Literal["output", "residual"] = Field(
        default="output", description="what is read and steered at the layer: its output, or its residual update "
                                      "(output minus input, what sdxl-unbox's SAEs read)")
    capture: str | None = Field(default=None, description="capture group name; default: the model's name")
    width: int = Field(description="channels of the layer (raw) or features of the SAE; checked at run time")
    block_size: int = Field(default=64, description="channels per channel-range partition")
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-stage parameters")

    @field_validator("capture", "layer")
    @classmethod
    def _safe_name(cls, value: str | None, info: Any) -> str | None:
        return _name(value, info.field_name)

    @field_validator("overrides")
    @classmethod
    def _known_stages(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = [stage for stage in value if stage not in OVERRIDE_STAGES]
        if unknown:
            raise ValueError(f"overrides: unknown stage(s) {unknown}; a variant may override the parameters of "
                             f"{list(OVERRIDE_STAGES)}")
        problems = [problem for stage, values in value.items() for problem in override_problems(stage, values)]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("block_size")
    @classmethod
    def _positive_block(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("block_size must be >= 1 (channels per partition block)")
        return value

    @field_validator("width")
    @classmethod
    def _positive_width(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("width must be >= 1 (the layer's channel count, or the SAE's feature count)")
        return value

    def channel_blocks(self) -> list[tuple[int, int]]:
        """``[(first, last), ...]`` inclusive channel ranges of ``block_size`` covering ``width``."""
        return [(first, min(first + self.block_size, self.width) - 1)
                for first in range(0, self.width, self.block_size)]

    @model_validator(mode="after")
    def _sae_given(self) -> VariantConfig:
        from ddr_core.basis import basis_required_hook

        required = basis_required_hook(self.basis)  # an unknown kind fails here, listing the known ones
        if self.basis != "raw" and not self.sae:
            raise ValueError(f"basis {self.basis!r} needs `sae: <name of an entry under saes>`")
        if required and self.hook != required:
            raise ValueError(f"basis {self.basis!r} reads the block's {required} update: set `hook: {required}`")
        if self.basis == "raw" and self.sae is not None:
            raise ValueError("basis 'raw' takes no `sae`; use basis: sae")
        blocks = math.ceil(self.width / self.block_size)
        if blocks > MAX_CHANNEL_BLOCKS:
            raise ValueError(f"width {self.width} / block_size {self.block_size} makes {blocks} channel-range "
                             f"partitions, more than {MAX_CHANNEL_BLOCKS}; raise block_size to at least "
                             f"{math.ceil(self.width / MAX_CHANNEL_BLOCKS)}")
        return self


ALL_PROFILE = "all"
"""The profile name that means every declared variant."""


class ProjectConfig(_Strict):
    experiment: str = "default"
    models: dict[str, ModelConfig]
    saes: dict[str, SaeSourceConfig] = Field(default_factory=dict)
    prompt_datasets: dict[str, PromptDatasetConfig]
    variants: dict[str, VariantConfig]
    labellers: dict[str, LabellerConfig] = Field(
        default_factory=dict, description="automatic labellers of features, named; a model picks one (`labeller:`)")
    default_variants: list[str] = Field(default_factory=list)
    profiles: dict[str, list[str]] = Field(
        default_factory=dict, description="named sets of variants the Dagster UI offers as partitions")
    profile: str = Field(
        "all", description="the profile(s) whose variants are partitions: a name, several joined by ',', or "
                           "'all' (DDR_PROFILE overrides)")
    comparisons: dict[str, ComparisonConfig] = Field(
        default_factory=dict, description="'<variant A>__<variant B>' -> a comparison the feature_matches asset "
                                          "matches (ddr_core.comparisons)")

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        return _name(value, "experiment")

    @field_validator("models", "saes", "prompt_datasets", "variants", "labellers")
    @classmethod
    def _entry_names(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        for name in value:
            _name(name, f"{info.field_name} name")
        return value

    @model_validator(mode="after")
    def _references(self) -> ProjectConfig:
        for name, variant in self.variants.items():
            if variant.model not in self.models:
                raise ValueError(f"variants.{name}.model: unknown model {variant.model!r}; "
                                 f"declared: {sorted(self.models)}")
            if variant.prompts not in self.prompt_datasets:
                raise ValueError(f"variants.{name}.prompts: unknown prompt dataset {variant.prompts!r}; "
                                 f"declared: {sorted(self.prompt_datasets)}")
            if variant.sae and variant.sae not in self.saes:
                raise ValueError(f"variants.{name}.sae: unknown SAE {variant.sae!r}; declared: {sorted(self.saes)}")
        for name, model in self.models.items():
            if model.labeller is not None and model.labeller not in self.labellers:
                raise ValueError(f"models.{name}.labeller: unknown labeller {model.labeller!r}; "
                                 f"declared: {sorted(self.labellers)}")
        groups: dict[str, tuple[str, ...]] = {}
        for name in self.variants:
            key = (self.variants[name].model, self.layer_of(name), self.variants[name].prompts)
            if self.variants[name].hook != "output":
                key = (*key, f"hook {self.variants[name].hook}")
            group = self.capture_of(name)
            if groups.setdefault(group, key) != key:
                raise ValueError(
                    f"variants.{name}.capture: capture group {group!r} mixes (model, layer, prompts) "
                    f"{groups[group]} and {key}; give this variant its own `capture:` name"
                )
        for name in self.default_variants:
            if name not in self.variants:
                raise ValueError(f"default_variants: unknown variant {name!r}")
        for profile, members in self.profiles.items():
            _name(profile, "profiles name")
            if profile == ALL_PROFILE:
                raise ValueError(f"profiles.{profile}: {ALL_PROFILE!r} is reserved (every variant); rename it")
            for name in members:
                if name not in self.variants:
                    close = difflib.get_close_matches(name, list(self.variants), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"profiles.{profile}: unknown variant {name!r}{hint}")
        self.profile_variants(self.profile, "profile")  # a profile that does not exist fails at load
        check_comparisons(self)
        missing = [v for v in self.default_variants if v not in self.profile_variants(self.profile, "profile")]
        if missing:
            raise ValueError(f"default_variants {missing} are not in profile {self.profile!r}: `make demo` runs them "
                             f"through their partitions; add them to the profile")
        return self

    def profile_variants(self, profile: str, where: str = "DDR_PROFILE") -> list[str]:
        """The variants of ``profile`` (``'all'``, one name, or several joined by ``,``), in declaration order.

        Raises:
            ValueError: a profile name that is not declared (names ``where`` it came from and the known ones).
        """
        names = [n.strip() for n in profile.split(",") if n.strip()]
        if not names:
            raise ValueError(f"{where}: empty profile; use {ALL_PROFILE!r} or one of {sorted(self.profiles)}")
        if ALL_PROFILE in names:
            return list(self.variants)
        unknown = [n for n in names if n not in self.profiles]
        if unknown:
            raise ValueError(f"{where}: unknown profile(s) {unknown}; declared: {sorted(self.profiles)} (or "
                             f"{ALL_PROFILE!r})")
        chosen = {v for n in names for v in self.profiles[n]}
        return [v for v in self.variants if v in chosen]

    def for_profile(self, profile: str | None = None) -> ProjectConfig:
        """This config restricted to a profile's variants and the models, SAEs and prompt datasets they use: what
        the Dagster code location offers as partitions. ``profile``: default ``DDR_PROFILE``, else the config's
        ``profile``. Stages run from Python keep the whole config."""
        chosen = profile or os.environ.get("DDR_PROFILE", "").strip() or self.profile
        where = "profile" if profile else ("DDR_PROFILE" if os.environ.get("DDR_PROFILE", "").strip() else "profile")
        variants = self.profile_variants(chosen, where)
        if len(variants) == len(self.variants):
            return self
        kept = {name: self.variants[name] for name in variants}
        used = lambda attr: {getattr(v, attr) for v in kept.values()}  # noqa: E731
        return self.model_copy(update={
            "variants": kept,
            "models": {k: v for k, v in self.models.items() if k in used("model")},
            "saes": {k: v for k, v in self.saes.items() if k in used("sae")},
            "prompt_datasets": {k: v for k, v in self.prompt_datasets.items() if k in used("prompts")},
            "default_variants": [v for v in self.default_variants if v in kept],
            "comparisons": {k: v for k, v in self.comparisons.items()
                            if all(side in kept for side in parse_comparison_name(k))},
            "profile": chosen,
        })

    # --- derived views -------------------------------------------------------------------------
    def layer_of(self, variant: str) -> str:
        v = self.variants[variant]
        return v.layer or self.models[v.model].default_layer

    def hook_of(self, variant: str) -> str:
        """What ``variant`` reads at its layer: ``"output"`` or ``"residual"``."""
        return self.variants[variant].hook

    def capture_of(self, variant: str) -> str:
        v = self.variants[variant]
        return v.capture or v.model

    def capture_groups(self) -> dict[str, list[str]]:
        """Capture group name -> the variants it records, in declaration order."""
        groups: dict[str, list[str]] = {}
        for name in self.variants:
            groups.setdefault(self.capture_of(name), []).append(name)
        return groups

    def capture_spec(self, group: str) -> tuple[str, str, str]:
        """(model, layer, prompt dataset) of a capture group."""
        variant = self.capture_groups()[group][0]
        return self.variants[variant].model, self.layer_of(variant), self.variants[variant].prompts

    def labelled_variants(self) -> list[str]:
        """Variants whose prompt dataset declares concept labels (those ``feature_concepts`` scores)."""
        return [name for name, v in self.variants.items() if self.prompt_datasets[v.prompts].labels is not None]

    def labeller_variants(self) -> list[str]:
        """Variants whose model names a labeller (those ``feature_labels`` labels)."""
        return [name for name, v in self.variants.items() if self.models[v.model].labeller is not None]

    def variant_hash(self, variant: str) -> str:
        # hook: output (the default, and all there was before the field) stays out, so older hashes hold
        data = self.variants[variant].model_dump(mode="json")
        if data.get("hook") == "output":
            data.pop("hook")
        return config_hash(data)


def config_hash(payload: Any) -> str:
    """Stable short hash of a JSON-serialisable payload (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_path() -> Path:
    return Path(os.environ.get("DDR_CONFIG") or DEFAULT_CONFIG_PATH)


class _DuplicateKey(Exception):
    def __init__(self, where: str, key: Any, first: int, second: int) -> None:
        super().__init__(where)
        self.where, self.key, self.first, self.second = where, key, first, second


def _walk_yaml(root: yaml.Node) -> dict[tuple[str, ...], int]:
    """The 1-based line of every key path in a composed YAML document (``("variants", "tiny-raw",
    "width") -> 97``; list items by index), refusing a key repeated in one mapping (:class:`_DuplicateKey`)
    and a document of more than :data:`MAX_CONFIG_VALUES` values (aliases included, so a nested-alias bomb
    stops here, before it is expanded)."""
    lines: dict[tuple[str, ...], int] = {(): root.start_mark.line + 1}
    stack: list[tuple[tuple[str, ...], yaml.Node]] = [((), root)]
    visited = 0
    while stack:
        path, node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                visited += 1
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # `<<: *base` entries may be overridden; complex keys: refused when built
                line = key_node.start_mark.line + 1
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise _DuplicateKey(".".join(path) or "(top level)", key_node.value, seen[key], line)
                seen[key] = line
                lines.setdefault((*path, key_node.value), line)
                stack.append(((*path, key_node.value), value_node))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                visited += 1
                lines.setdefault((*path, str(index)), item.start_mark.line + 1)
                stack.append(((*path, str(index)), item))
        if visited > MAX_CONFIG_VALUES:
            raise ConfigError(f"more than {MAX_CONFIG_VALUES} values (counting through aliases); a configuration "
                              f"is a few hundred: remove the nested aliases (`*name`) that multiply it")
    return lines


def _read_yaml(path: Path) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The YAML document of ``path`` and the line of each key path (:func:`_walk_yaml`)."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes, more than the {MAX_CONFIG_BYTES} a configuration may have; "
                          f"is this the right file?")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes().count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not UTF-8 (byte 0x{path.read_bytes()[exc.start]:02x} on line {line}); "
                          f"re-save the file as UTF-8") from None
    loader = yaml.SafeLoader(text)
    loader.name = str(path)  # YAML's own messages then name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines = _walk_yaml(node)
        return loader.construct_document(node), lines
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: key {exc.key!r} appears twice in {exc.where} (lines {exc.first} and "
                          f"{exc.second}); YAML would silently keep the second: delete one of them") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _field_names_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the config model that holds the field at ``loc`` (for a misspelt key), or ``[]``."""
    annotation: Any = ProjectConfig
    for part in loc[:-1]:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part not in annotation.model_fields:
                return []
            annotation = annotation.model_fields[part].annotation
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    annotation = _unwrap(annotation)
    return list(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _unwrap(annotation: Any) -> Any:
    """``X`` of ``X | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _describe(error: Any, lines: dict[tuple[str, ...], int], source: Path) -> str:
    """One validation error as ``  <file>:<line>: <field>: <problem and fix>`` (the form editors jump to)."""
    loc = tuple(error["loc"])
    where = ".".join(str(part) for part in loc) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        known = _field_names_at(loc)
        message = (f"unknown field {loc[-1]!r}{nearest(str(loc[-1]), known)}; the fields here: {sorted(known)}"
                   if known else "unknown field; remove it")
    else:
        message += _got(error)
    path = tuple(str(part) for part in loc)
    leading = re.match(r"([\w-]+(?:\.[\w-]+)*): ", message)  # "<stage>.<field>: ..." of an override problem
    if leading and (*path, *leading.group(1).split(".")) in lines:
        path = (*path, *leading.group(1).split("."))
    while path and path not in lines:
        path = path[:-1]
    line = f"{source}:{lines[path]}: " if path in lines else ""
    return f"  {line}{where}: {message}"


def load_project_config(path: str | Path | None = None) -> ProjectConfig:
    """Read and validate the project configuration.

    Refused, each naming the file, the field (its dotted path and line) and the fix: a key written twice in one
    mapping (YAML would keep the second silently), a value of the wrong type (strict: ``width: true`` is not 1,
    ``width: "64"`` is not 64), an unknown field (with the nearest known name), an empty name, text field or
    source id, a variant override that is not a valid parameter of its stage (:func:`override_problems`), a file
    over :data:`MAX_CONFIG_BYTES` or expanding to over :data:`MAX_CONFIG_VALUES` values, nesting too deep.

    Raises:
        ConfigError: the file is missing, is not YAML, or a field is invalid (the field is named).
    """
    path = Path(path) if path is not None else config_path()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; set DDR_CONFIG to your config or restore "
                          f"{DEFAULT_CONFIG_PATH.relative_to(PROJECT_ROOT)}")
    try:
        raw, lines = _read_yaml(path)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        described = "\n".join(_describe(err, lines, path) for err in exc.errors())
        raise ConfigError(f"{path}: invalid configuration\n{described}") from None
    experiment = os.environ.get("DDR_EXPERIMENT")
    if experiment:
        try:
            check_name(experiment, "experiment")
        except UnsafePathError as exc:
            raise ConfigError(f"DDR_EXPERIMENT (overrides `experiment` of {path}): {exc}") from None
        config = config.model_copy(update={"experiment": experiment})
    return config


def data_root() -> Path:
    """The data root: ``DDR_DATA_ROOT`` or ``<project>/data``."""
    return Path(os.environ.get("DDR_DATA_ROOT") or DEFAULT_DATA_ROOT).resolve()
