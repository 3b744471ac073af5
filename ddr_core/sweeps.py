"""Dream hyperparameter sweeps: a grid of :class:`~ddr_core.dreams.DreamConfig` settings on a few channels.

A sweep dreams the same channels once per *setting* (one point of the cartesian product of the
grid's value lists) and compares the settings in one table. It never writes into the ``dreams``
stage folder; everything lives under ``<outputs>/dream_sweeps/<name>/<variant>/``::

    settings.json                 the expanded grid: per setting its index, swept values, full
                                  DreamConfig and config hash (fixed by the first run)
    setting_<i:03d>/              a complete dreams folder (see :mod:`ddr_core.dreams`), resumable
      channel_<c:05d>/...
      quality.parquet
    comparison.parquet            one row per (setting, channel, timestep, seed), see COMPARISON_COLUMNS
    comparison.duckdb             view ``comparison`` over the Parquet file + table ``settings``
    contact_sheet_channel_<c:05d>.png   rows = settings, columns = (timestep, seed) final images

A setting's config is built as: DreamConfig defaults <- the variant's ``overrides.dreams`` from the
project config <- ``base`` <- the setting's grid values. Settings are resumable: a channel with
``dream.json`` is skipped (:func:`~ddr_core.dreams.run_dreams`) and its quality rows are cached,
so a re-run of a finished sweep loads no model at all. A run whose expanded settings differ from
``settings.json`` is refused (pick another ``name``, or delete the folder).

Open the comparison with DuckDB::

    duckdb data/outputs/default/dream_sweeps/lr_tv/tiny-raw/comparison.duckdb \\
      "select setting, avg(ratio) from comparison group by setting order by 2 desc"
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddr_core.atomic import atomic_path, atomic_write_json
from ddr_core.channel_store import DREAM_FILE, channel_dir, channel_name, timestep_dir_name
from ddr_core.dreams import QUALITY_FILE, DreamConfig, finished_channels, measure_dream_quality, run_dreams
from ddr_core.lazy_imports import lazy_module
from ddr_core.paths import UnsafePathError, check_name

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

LogFn = Callable[[str], None]
SWEEPS_STAGE = "dream_sweeps"
SETTINGS_FILE = "settings.json"
COMPARISON_FILE = "comparison.parquet"
DATABASE_FILE = "comparison.duckdb"
SETTINGS_FORMAT = "ddr.dream_sweeps/1"
FINAL_STATS: tuple[str, ...] = ("activation", "tv", "range", "moment", "loss")
MEASURED_COLUMNS: dict[str, Any] = {
    "final_activation": pl.Float64,
    "final_tv": pl.Float64,
    "final_range": pl.Float64,
    "final_moment": pl.Float64,
    "final_loss": pl.Float64,
    "steps_run": pl.Int32,
    "dream_activation": pl.Float64,
    "prior_activation": pl.Float64,
    "top_example_activation": pl.Float64,
    "ratio": pl.Float64,
    "failed": pl.Boolean,
}
"""Columns after ``setting``, the swept parameters, ``channel``, ``timestep``, ``seed``."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _known_fields() -> list[str]:
    return sorted(DreamConfig.model_fields)


class SweepConfig(BaseModel):
    """A grid of dream hyperparameters run on a few channels of one variant."""

    model_config = ConfigDict(extra="forbid")

    variant: str = Field(..., description="variant whose channels are dreamed (e.g. tiny-raw)")
    channels: list[int] = Field(..., min_length=1, max_length=64,
                                description="a few channels (or SAE features) dreamed under every setting")
    grid: dict[str, list[Any]] = Field(
        ..., min_length=1,
        description="DreamConfig field -> values to try, e.g. {learning_rate: [0.02, 0.05], "
                    "total_variation_weight: [0.0, 0.5]}; the settings are the cartesian product",
    )
    base: dict[str, Any] = Field(default_factory=dict,
                                 description="DreamConfig overrides shared by every setting, e.g. {num_steps: 50}")
    name: str = Field("sweep", description="sweep folder name (lower-case letters, digits, '-', '_', '.')")
    sheet_cell_size: int = Field(160, ge=32, le=1024, description="pixels per image in the contact sheets")

    @field_validator("channels")
    @classmethod
    def _distinct_channels(cls, value: list[int]) -> list[int]:
        if any(c < 0 for c in value):
            raise ValueError(f"channels must be >= 0, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"channels must be distinct, got {value}")
        return value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        try:
            return check_name(value, "name")
        except UnsafePathError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("grid")
    @classmethod
    def _known_grid(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if key not in DreamConfig.model_fields:
                raise ValueError(f"grid: {key!r} is not a DreamConfig field; known fields: {_known_fields()}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid: {key!r} needs a non-empty list of values, got {values!r}")
        return value

    @field_validator("base")
    @classmethod
    def _known_base(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(DreamConfig.model_fields))
        if unknown:
            raise ValueError(f"base: {unknown} are not DreamConfig fields; known fields: {_known_fields()}")
        return value

    @model_validator(mode="after")
    def _valid_settings(self) -> SweepConfig:
        both = sorted(set(self.grid) & set(self.base))
        if both:
            raise ValueError(f"{both} appear in both grid and base: put each field in one of them")
        for index, setting in enumerate(expand_grid(self.grid)):
            try:
                DreamConfig.model_validate({**self.base, **setting})
            except ValidationError as error:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}"
                                     for e in error.errors())
                raise ValueError(f"setting {index} {setting} is not a valid DreamConfig: {problems}") from None
        return self

    def settings(self, overrides: dict[str, Any] | None = None) -> list[DreamConfig]:
        """The DreamConfig of every setting (defaults <- ``overrides`` <- ``base`` <- grid values)."""
        return [DreamConfig.model_validate({**(overrides or {}), **self.base, **setting})
                for setting in expand_grid(self.grid)]


def expand_grid(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``grid``'s value lists, as ``[{field: value}]``.

    Order is stable: fields in the grid's order, the last field varying fastest (like nested loops),
    values in their list order. An empty grid gives one empty setting.
    """
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


# --------------------------------------------------------------------------------------------------
# Paths and the settings file
# --------------------------------------------------------------------------------------------------


def sweep_dir(layout: Any, name: str, variant: str) -> Path:
    """``<outputs>/dream_sweeps/<name>/<variant>``; both must be safe names (:func:`~ddr_core.paths.check_name`)."""
    return layout.outputs_dir / SWEEPS_STAGE / check_name(name, "sweep name") / check_name(variant, "variant")


def setting_dir(root: Path, index: int) -> Path:
    return Path(root) / f"setting_{index:03d}"


def contact_sheet_path(root: Path, channel: int) -> Path:
    return Path(root) / f"contact_sheet_{channel_name(channel)}.png"


def _column_value(value: Any) -> Any:
    """A swept value as a table cell: scalars as they are, lists/dicts as compact JSON."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, separators=(",", ":"))


def setting_label(params: dict[str, Any]) -> str:
    """``learning_rate=0.05, total_variation_weight=0.5`` (used in the contact sheets)."""
    return ", ".join(f"{k}={_column_value(v)}" for k, v in params.items()) or "(base)"


class SweepSettingsMismatch(ValueError):
    """The sweep folder was started with other settings."""


def _settings_payload(config: SweepConfig, settings: list[DreamConfig]) -> dict[str, Any]:
    rows = []
    for index, dream_config in enumerate(settings):
        params = {k: getattr(dream_config, k) for k in config.grid}
        rows.append({
            "setting": index,
            "params": {k: dream_config.model_dump(mode="json")[k] for k in params},
            "label": setting_label({k: dream_config.model_dump(mode="json")[k] for k in params}),
            "config": dream_config.model_dump(mode="json"),
            "config_hash": dream_config.config_hash(),
        })
    return {"format": SETTINGS_FORMAT, "name": config.name, "variant": config.variant,
            "grid": config.grid, "base": config.base, "swept": list(config.grid), "settings": rows}


def _check_or_write_settings(root: Path, payload: dict[str, Any]) -> None:
    path = root / SETTINGS_FILE
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        old = [s["config_hash"] for s in existing.get("settings", [])]
        new = [s["config_hash"] for s in payload["settings"]]
        if old != new or existing.get("swept") != payload["swept"]:
            raise SweepSettingsMismatch(
                f"{root} holds the sweep {existing.get('name')!r} with other settings ({len(old)} setting(s) over "
                f"{existing.get('swept')}); give this sweep another name, or delete {root} to redo it"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What :func:`run_sweep` did and wrote."""

    root: Path
    settings: list[dict[str, Any]]
    settings_run: list[int] = field(default_factory=list)
    settings_skipped: list[int] = field(default_factory=list)
    element_steps: int = 0
    seconds: float = 0.0
    comparison: pl.DataFrame | None = None
    comparison_path: Path | None = None
    database_path: Path | None = None
    contact_sheets: dict[int, Path] = field(default_factory=dict)

    def summary(self) -> pl.DataFrame:
        """Per setting: its label, mean final activation, mean ratio, failures (best mean ratio first,
        then best mean final activation)."""
        return summarise(self.comparison, self.settings)


def summarise(comparison: pl.DataFrame | None, settings: list[dict[str, Any]]) -> pl.DataFrame:
    labels = pl.DataFrame({"setting": [s["setting"] for s in settings], "label": [s["label"] for s in settings]},
                          schema={"setting": pl.Int32, "label": pl.String})
    if comparison is None or comparison.height == 0:
        return labels
    stats = comparison.group_by("setting").agg(
        pl.col("final_activation").mean().alias("mean_final_activation"),
        pl.col("dream_activation").mean().alias("mean_dream_activation"),
        pl.col("ratio").mean().alias("mean_ratio"),
        pl.col("failed").sum().cast(pl.Int32).alias("failed"),
        pl.len().cast(pl.Int32).alias("dreams"),
    )
    return (labels.join(stats, on="setting", how="left")
            .sort(["mean_ratio", "mean_final_activation"], descending=True, nulls_last=True))


class _Models:
    """The variant's model (one per dtype) and basis, loaded on first use."""

    def __init__(self, project: Any, layout: Any, variant: str, device: torch.device):
        self.project, self.layout, self.variant, self.device = project, layout, variant, device
        self._pipes: dict[str, Any] = {}
        self._basis: Any = None

    def get(self, dtype_name: str, dtype: torch.dtype) -> tuple[Any, Any]:
        from ddr_core.basis import check_weights_match_capture, load_basis
        from ddr_core.families import load_model

        spec = self.project.variants[self.variant]
        if not self._pipes:
            check_weights_match_capture(self.project, self.layout, self.variant)
        if dtype_name not in self._pipes:
            self._pipes[dtype_name] = load_model(self.layout.model_dir(spec.model), device=self.device, dtype=dtype)
            self._pipes[dtype_name].read_layer_as(self.project.layer_of(self.variant),
                                                  self.project.hook_of(self.variant))
        pipe = self._pipes[dtype_name]
        if self._basis is None:
            self._basis = load_basis(self.project, self.layout, self.variant, pipe, self.device)
        return pipe, self._basis


def _setting_finished(folder: Path, channels: Sequence[int]) -> bool:
    done = finished_channels(folder)
    return all(c in done and (channel_dir(folder, c) / QUALITY_FILE).is_file() for c in channels)


def run_sweep(
    project: Any,
    layout: Any,
    config: SweepConfig,
    device: torch.device | str,
    log: LogFn | None = None,
) -> SweepResult:
    """Dream ``config.channels`` once per setting of the grid and compare the settings.

    Reads the variant's timestep statistics (``layout.timestep_stats_dir``; needed for timestep
    keywords and for the quality ratio) and, for settings with ``use_prior``, its priors folder.
    Writes the layout in the module docstring. Finished settings are skipped without loading the model.

    Raises:
        KeyError: an unknown variant (naming the known ones).
        SweepSettingsMismatch: the folder holds a sweep with other settings.
        ValueError: a channel outside the variant's width, a width mismatch, or an invalid setting.
    """
    start = time.monotonic()
    if config.variant not in project.variants:
        raise KeyError(f"unknown variant {config.variant!r}; known: {sorted(project.variants)}")
    spec = project.variants[config.variant]
    outside = [c for c in config.channels if c >= spec.width]
    if outside:
        raise ValueError(f"channels {outside} are outside variant {config.variant!r} (width {spec.width})")
    overrides = dict(spec.overrides.get("dreams", {}))
    settings = config.settings(overrides)
    root = sweep_dir(layout, config.name, config.variant)
    payload = _settings_payload(config, settings)
    _check_or_write_settings(root, payload)

    device = torch.device(device)
    models = _Models(project, layout, config.variant, device)
    layer_name = project.layer_of(config.variant)
    stats_dir = layout.timestep_stats_dir(config.variant)
    priors_dir = layout.stage_dir("priors", config.variant)
    result = SweepResult(root=root, settings=payload["settings"])
    for index, dream_config in enumerate(settings):
        folder = setting_dir(root, index)
        label = payload["settings"][index]["label"]
        if _setting_finished(folder, config.channels):
            result.settings_skipped.append(index)
            if log:
                log(f"dream_sweeps: setting {index} ({label}) already done")
            continue
        if log:
            log(f"dream_sweeps: setting {index + 1}/{len(settings)}: {label}")
        pipe, basis = models.get(dream_config.dtype, dream_config.torch_dtype())
        dreams = run_dreams(
            pipe, basis, layer_name, stats_dir, priors_dir if dream_config.start_from == "prior" else None,
            config.channels, folder, dream_config, data_root=layout.data_root, log=log,
        )
        measure_dream_quality(pipe, basis, layer_name, folder, stats_dir, dream_config, channels=config.channels)
        result.settings_run.append(index)
        result.element_steps += dreams.element_steps

    comparison = comparison_table(root, payload, config.channels)
    with atomic_path(root / COMPARISON_FILE) as tmp:
        comparison.write_parquet(tmp)
    result.comparison, result.comparison_path = comparison, root / COMPARISON_FILE
    result.database_path = write_comparison_database(root, payload)
    for channel in config.channels:
        sheet = contact_sheet(root, payload, channel, comparison, config.sheet_cell_size)
        path = contact_sheet_path(root, channel)
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        result.contact_sheets[channel] = path
    result.seconds = time.monotonic() - start
    return result


# --------------------------------------------------------------------------------------------------
# The comparison table, its database and the contact sheets
# --------------------------------------------------------------------------------------------------


def _final_stats(stats_path: Path) -> dict[int, dict[str, Any]]:
    """Seed -> the last recorded row of ``stats.parquet`` (``final_<stat>`` and ``steps_run``)."""
    if not stats_path.is_file():
        return {}
    frame = pl.read_parquet(stats_path).sort(["seed", "step"])
    out: dict[int, dict[str, Any]] = {}
    for seed, rows in frame.group_by("seed", maintain_order=True):
        last = rows.row(rows.height - 1, named=True)
        out[int(seed[0])] = {**{f"final_{s}": last[s] for s in FINAL_STATS}, "steps_run": rows.height}
    return out


def comparison_table(root: Path, payload: dict[str, Any], channels: Sequence[int]) -> pl.DataFrame:
    """One row per (setting, channel, timestep, seed) from the settings' dream folders.

    Columns: ``setting``, one column per swept parameter, ``channel``, ``timestep``, ``seed``, then
    :data:`MEASURED_COLUMNS` (final stats from the last row of ``stats.parquet``; quality columns
    from ``quality.parquet``). Channels dreamed at no timestep contribute no rows.
    """
    swept = payload["swept"]
    rows: list[dict[str, Any]] = []
    for setting in payload["settings"]:
        folder = setting_dir(root, setting["setting"])
        quality_rows: dict[tuple[int, int, int], dict[str, Any]] = {}
        for channel in channels:
            quality_path = channel_dir(folder, channel) / QUALITY_FILE
            if quality_path.is_file():
                for row in pl.read_parquet(quality_path).iter_rows(named=True):
                    quality_rows[(row["channel"], row["timestep"], row["seed"])] = row
        for channel in channels:
            dream_path = channel_dir(folder, channel) / DREAM_FILE
            if not dream_path.is_file():
                continue
            dream = json.loads(dream_path.read_text(encoding="utf-8"))
            failed = {(f["timestep"], f["seed"]) for f in dream.get("failures", [])}
            for timestep in dream["timesteps"]:
                finals = _final_stats(channel_dir(folder, channel) / timestep_dir_name(timestep) / "stats.parquet")
                for seed in dream["seeds"]:
                    quality = quality_rows.get((channel, timestep, seed), {})
                    final = finals.get(seed, {})
                    rows.append({
                        "setting": setting["setting"],
                        **{name: _column_value(setting["params"][name]) for name in swept},
                        "channel": channel, "timestep": int(timestep), "seed": int(seed),
                        **{name: final.get(name) for name in MEASURED_COLUMNS if name.startswith(("final_", "steps"))},
                        "dream_activation": quality.get("dream_activation"),
                        "prior_activation": quality.get("prior_activation"),
                        "top_example_activation": quality.get("top_example_activation"),
                        "ratio": quality.get("ratio"),
                        "failed": bool(quality.get("failed", (timestep, seed) in failed)),
                    })
    schema = {"setting": pl.Int32, "channel": pl.Int32, "timestep": pl.Int32, "seed": pl.Int64, **MEASURED_COLUMNS}
    columns = ["setting", *swept, "channel", "timestep", "seed", *MEASURED_COLUMNS]
    if not rows:
        return pl.DataFrame(schema={c: schema.get(c, pl.String) for c in columns})
    frame = pl.DataFrame(rows, infer_schema_length=None, strict=False)
    return frame.with_columns([pl.col(c).cast(t) for c, t in schema.items()]).select(columns)


def write_comparison_database(root: Path, payload: dict[str, Any]) -> Path:
    """(Re)create ``comparison.duckdb``: view ``comparison`` over ``comparison.parquet`` (absolute path;
    rerun after moving the folder) and table ``settings`` (setting, label, config_hash, config JSON,
    one column per swept parameter)."""
    root = Path(root).resolve()
    destination = root / DATABASE_FILE
    parquet = (root / COMPARISON_FILE).as_posix().replace("'", "''")
    settings = pl.DataFrame([
        {"setting": s["setting"], "label": s["label"], "config_hash": s["config_hash"],
         "config": json.dumps(s["config"], sort_keys=True),
         **{f"param_{k}": _column_value(s["params"][k]) for k in payload["swept"]}}
        for s in payload["settings"]
    ], strict=False)
    settings = settings.rename({f"param_{k}": k for k in payload["swept"]})
    with atomic_path(destination) as tmp:
        con = duckdb.connect(str(tmp))
        try:
            con.execute(f"CREATE VIEW comparison AS SELECT * FROM read_parquet('{parquet}')")
            con.register("settings_frame", settings.to_arrow())
            con.execute("CREATE TABLE settings AS SELECT * FROM settings_frame ORDER BY setting")
            con.unregister("settings_frame")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return destination


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: Any, width: int, draw: Any) -> list[str]:
    lines: list[str] = []
    for part in text.split(", "):
        candidate = f"{lines[-1]}, {part}" if lines else part
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(part)
    return lines


def contact_sheet(root: Path, payload: dict[str, Any], channel: int, comparison: pl.DataFrame,
                  cell: int = 160) -> Any:
    """One channel's final dream images: a row per setting (labelled with its swept values on the
    left), a column per (timestep, seed) (header on top); each cell is captioned with the dream's
    re-measured activation (``act``) and failed dreams are marked. Missing images are grey cells.

    Size: ``(label_width + columns * cell, header + settings * cell)`` with
    ``label_width = max(cell * 1.5, 220)`` and ``header = 28``.
    """
    from PIL import Image, ImageDraw

    settings = payload["settings"]
    rows = comparison.filter(pl.col("channel") == channel)
    keys = sorted({(int(t), int(s)) for t, s in rows.select("timestep", "seed").iter_rows()},
                  key=lambda item: (-item[0], item[1]))
    label_width, header = max(int(cell * 1.5), 220), 28
    width, height = label_width + max(len(keys), 1) * cell, header + len(settings) * cell
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(13), _font(11)
    draw.text((6, 6), f"channel {channel}", fill="black", font=font)
    if not keys:
        draw.text((label_width + 6, 6), "no dreams (no timesteps)", fill="black", font=font)
    for column, (timestep, seed) in enumerate(keys):
        draw.text((label_width + column * cell + 4, 6), f"t={timestep} seed={seed}", fill="black", font=small)
    by_key = {(r["setting"], r["timestep"], r["seed"]): r for r in rows.iter_rows(named=True)}
    for row_index, setting in enumerate(settings):
        top = header + row_index * cell
        draw.line([(0, top), (width, top)], fill=(200, 200, 200))
        lines = [f"setting {setting['setting']}", *_wrap(setting["label"], small, label_width - 10, draw)]
        for line_index, line in enumerate(lines[: max(cell // 15, 1)]):
            draw.text((6, top + 4 + 15 * line_index), line, fill="black", font=font if line_index == 0 else small)
        folder = setting_dir(root, setting["setting"])
        for column, (timestep, seed) in enumerate(keys):
            left = label_width + column * cell
            path = channel_dir(folder, channel) / timestep_dir_name(timestep) / f"seed_{seed}.png"
            if path.is_file():
                with Image.open(path) as image:
                    resample = Image.Resampling.NEAREST if image.width < cell else Image.Resampling.LANCZOS
                    sheet.paste(image.convert("RGB").resize((cell, cell), resample), (left, top))
            else:
                draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=(160, 160, 160))
            row = by_key.get((setting["setting"], timestep, seed))
            if row is not None:
                value = row["dream_activation"]
                caption = "failed" if row["failed"] else (f"act {value:.3g}" if value is not None else "act ?")
                box = draw.textbbox((left + 3, top + cell - 16), caption, font=small)
                draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill="black")
                draw.text((left + 3, top + cell - 16), caption, fill="red" if row["failed"] else "white", font=small)
    return sheet
