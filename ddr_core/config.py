"""Project configuration: models, SAEs, prompt datasets and the variants analysed.

The configuration is one YAML file (``config/ddr.yaml`` by default, or the file named by ``DDR_CONFIG``).
It is parsed into explicit pydantic objects; every validation error names the offending field and file.

Vocabulary:

- a **model** is a diffusers Stable Diffusion folder, provisioned from a *source*;
- an **SAE** is a SAeUron-format sparse autoencoder for one layer of a model;
- a **prompt dataset** is a JSONL (``text`` field) or text file of prompts; it may declare ground-truth
  concept ``labels`` of its prompts (JSONL fields, or a parser of the prompt text), which enables the
  ``feature_concepts`` scores of its variants;
- a **variant** is model + target layer + basis (raw channels or one SAE) + prompt dataset;
  every per-channel stage is partitioned by variant;
- a **capture group** is the set of variants sharing model, layer and prompts: one generation pass
  records all of them at once (no generation is repeated per variant).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddr_core.paths import UnsafePathError, check_name, check_relative_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "ddr.yaml"
DEFAULT_DATA_ROOT = PROJECT_ROOT / "data"
DEFAULT_LAYER = "up_blocks.1.attentions.1"

OVERRIDE_STAGES: tuple[str, ...] = ("priors", "dreams")
"""Stages whose parameters a variant may override (``variants.<v>.overrides.<stage>``)."""


class ConfigError(ValueError):
    """The project configuration is invalid; the message names the field and the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSourceConfig(_Strict):
    repo_id: str
    revision: str = "main"
    allow_patterns: list[str] | None = None
    repo_type: Literal["model", "dataset"] = "model"


class GoogleDriveSourceConfig(_Strict):
    file_id: str | None = None
    folder_id: str | None = None
    filename: str | None = None

    @field_validator("filename")
    @classmethod
    def _filename_inside(cls, value: str | None) -> str | None:
        return _relative_inside(value, "filename")

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

    builtin: Literal["tiny", "tiny-sae", "tiny-prompts"] | None = None
    hub: HubSourceConfig | None = None
    gdrive: GoogleDriveSourceConfig | None = None
    local: str | None = None

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

    world: Literal["toy-world"] | None = Field(
        default=None,
        description="the synthetic world the model was trained on (`toy-world`): feature_concepts also measures "
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
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families repeat: {self.families}")
        if self.parser is not None:
            unknown = sorted(set(self.families) - set(LABEL_PARSERS[self.parser]))
            if unknown:
                raise ValueError(f"parser {self.parser!r} gives the families {list(LABEL_PARSERS[self.parser])}, "
                                 f"not {unknown}")
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

    @model_validator(mode="after")
    def _label_fields_need_jsonl(self) -> PromptDatasetConfig:
        if self.labels is not None and self.labels.parser is None and not self.file.lower().endswith(
                (".jsonl", ".ndjson")):
            raise ValueError(f"labels without a parser are read from JSONL fields, but file {self.file!r} is not "
                             f"JSONL; use a .jsonl file or set labels.parser")
        return self


class VariantConfig(_Strict):
    """One analysed basis of one layer of one model."""

    model: str
    prompts: str
    basis: Literal["raw", "sae"] = "raw"
    sae: str | None = None
    layer: str | None = Field(default=None, description="dotted UNet module name; default: the model's")
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
        if self.basis == "sae" and not self.sae:
            raise ValueError("basis 'sae' needs `sae: <name of an entry under saes>`")
        if self.basis == "raw" and self.sae:
            raise ValueError("basis 'raw' takes no `sae`; use basis: sae")
        return self


class ProjectConfig(_Strict):
    experiment: str = "default"
    models: dict[str, ModelConfig]
    saes: dict[str, SaeSourceConfig] = Field(default_factory=dict)
    prompt_datasets: dict[str, PromptDatasetConfig]
    variants: dict[str, VariantConfig]
    default_variants: list[str] = Field(default_factory=list)

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        return _name(value, "experiment")

    @field_validator("models", "saes", "prompt_datasets", "variants")
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
        groups: dict[str, tuple[str, str, str]] = {}
        for name in self.variants:
            key = (self.variants[name].model, self.layer_of(name), self.variants[name].prompts)
            group = self.capture_of(name)
            if groups.setdefault(group, key) != key:
                raise ValueError(
                    f"variants.{name}.capture: capture group {group!r} mixes (model, layer, prompts) "
                    f"{groups[group]} and {key}; give this variant its own `capture:` name"
                )
        for name in self.default_variants:
            if name not in self.variants:
                raise ValueError(f"default_variants: unknown variant {name!r}")
        return self

    # --- derived views -------------------------------------------------------------------------
    def layer_of(self, variant: str) -> str:
        v = self.variants[variant]
        return v.layer or self.models[v.model].default_layer

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

    def variant_hash(self, variant: str) -> str:
        return config_hash(self.variants[variant].model_dump(mode="json"))


def config_hash(payload: Any) -> str:
    """Stable short hash of a JSON-serialisable payload (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_path() -> Path:
    return Path(os.environ.get("DDR_CONFIG") or DEFAULT_CONFIG_PATH)


def load_project_config(path: str | Path | None = None) -> ProjectConfig:
    """Read and validate the project configuration.

    Raises:
        ConfigError: the file is missing, is not YAML, or a field is invalid (the field is named).
    """
    path = Path(path) if path is not None else config_path()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; set DDR_CONFIG to your config or restore "
                          f"{DEFAULT_CONFIG_PATH.relative_to(PROJECT_ROOT)}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError(f"{path}: invalid configuration\n" + "\n".join(lines)) from None
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
