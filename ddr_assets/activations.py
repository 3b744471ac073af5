"""``activations``: generate images for a prompt set and record every variant's activations.

Partitioned by capture group (variants sharing model, layer and prompts): one generation pass records
raw channels and every SAE of the group at once. The work runs through ``compute.run_stage``
(``capture_group``), in-process or as a SLURM job.
"""


import base64
import io
import re
from pathlib import Path

import dagster as dg

from ddr_assets.configs import PERFORMANCE_FIELD, SLURM_FIELD, dagster_config_from, performance_args, to_core
from ddr_assets.lineage import lineage_metadata, path_metadata, require_upstream
from ddr_assets.partitions import (
    capture_partitions,
    capture_to_model_mapping,
    capture_to_prompts_mapping,
    capture_to_sae_mapping,
)
from ddr_core.activations import CaptureConfig
from ddr_core.config import config_hash
from ddr_core.markdown_text import escape_markdown
from ddr_core.paths import resolve_in_data_root
from ddr_core.records import make_record, read_record, write_record
from ddr_resources.resources import ComputeResource, DdrStorage, compute_metadata

ACTIVATIONS_CODE_VERSION = "1"
ActivationsConfig = dagster_config_from(CaptureConfig, "ActivationsConfig",
                                        extra={"slurm": SLURM_FIELD, "performance": PERFORMANCE_FIELD})


def upstream_versions(storage: DdrStorage, group: str, required_by: str) -> dict[str, str]:
    """Content hashes of the model, SAEs and prompts a capture group uses (from their records)."""
    cfg = storage.project
    records_dir = storage.layout.provisioning_records_dir
    model, _, prompts = cfg.capture_spec(group)
    needed = [("models", model), ("prompt_datasets", prompts)]
    needed += [("saes", cfg.variants[v].sae) for v in cfg.capture_groups()[group] if cfg.variants[v].sae]
    return {f"{asset}/{key}": read_record(records_dir, asset, key, required_by=required_by)["data_version"]
            for asset, key in needed}


def loaded_versions(context: dg.AssetExecutionContext, recorded: dict[str, str],
                    loaded: dict[str, str]) -> dict[str, str]:
    """The upstream versions of what the capture actually loaded: the content hash of each model / SAE
    folder as verified at load time, in place of its provisioning record's when they differ (the folder was
    re-provisioned outside this asset graph, e.g. by SAE training), with a warning naming the fix."""
    versions = dict(recorded)
    for key, version in sorted(loaded.items()):
        if key in versions and versions[key] != version:
            asset, _, partition = key.partition("/")
            context.log.warning(
                f"{key}: the folder loaded has content hash {version[:12]}, its provisioning record says "
                f"{versions[key][:12]} (it was provisioned again outside this asset); recording what was loaded. "
                f"Materialize {asset}[{partition}] to bring its record up to date: `dagster asset materialize "
                f"-m dagster_project.definitions --select {asset} --partition {partition}`"
            )
        versions[key] = version
    return versions


_LABEL_PARTS = (("channel", re.compile(r"channel_0*(\d+)")), ("t", re.compile(r"^t_0*(\d+)$")),
                ("seed", re.compile(r"^seed_(-?\d+)\.png$")), ("generation", re.compile(r"^gen_0*(\d+)\.png$")))


def preview_label(path: Path) -> str:
    """A caption from ddr's own file layout: ``channel_00012/t_0501/seed_3.png`` -> ``channel 12, t=501, seed 3``;
    any other file: its name."""
    found = []
    for part in path.parts[-3:]:
        for name, pattern in _LABEL_PARTS:
            match = pattern.search(part) if name == "channel" else pattern.fullmatch(part)
            if match:
                found.append(f"t={int(match.group(1))}" if name == "t" else f"{name} {int(match.group(1))}")
    return ", ".join(found) or path.name


def image_preview(paths: list[Path] | list[tuple[Path, str]], size: int = 160) -> dg.MetadataValue:
    """Labelled images inline in the asset's metadata: a Markdown table (captions as the header, data escaped)
    of data-URL PNGs. An image smaller than ``size`` is enlarged by a whole factor with nearest-neighbour (a
    32 px toy image stays pixel-sharp, readable); a larger one is shrunk to fit. ``paths``: files (captioned by
    :func:`preview_label`) or ``(file, caption)`` pairs."""
    from PIL import Image

    labels, cells = [], []
    for item in paths:
        path, label = item if isinstance(item, tuple) else (item, preview_label(Path(item)))
        with Image.open(path) as image:
            image = image.convert("RGB")
            factor = size // max(image.size)
            if factor >= 2:
                image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
            else:
                image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
        # the caption and alt text are data (file names, prompts): escaped; the URL is the data URL made here
        encoded = base64.b64encode(buffer.getvalue()).decode()
        labels.append(escape_markdown(label))
        cells.append(f"![{escape_markdown(label)}](data:image/png;base64,{encoded})")
    if not cells:
        return dg.MetadataValue.md("_(no images)_")
    return dg.MetadataValue.md("| " + " | ".join(labels) + " |\n|" + "---|" * len(cells) + "\n| "
                               + " | ".join(cells) + " |")


@dg.asset(
    partitions_def=capture_partitions(),
    deps=[
        dg.AssetDep("models", partition_mapping=capture_to_model_mapping()),
        dg.AssetDep("saes", partition_mapping=capture_to_sae_mapping()),
        dg.AssetDep("prompt_datasets", partition_mapping=capture_to_prompts_mapping()),
    ],
    group_name="activations",
    code_version=ACTIVATIONS_CODE_VERSION,
    kinds={"pytorch", "parquet", "safetensors"},
    pool="gpu",
    description="Images for the prompt set and each variant's spatial-mean activation per channel and "
                "timestep (conditional and unconditional CFG halves apart); resumable, shardable.",
)
def activations(context: dg.AssetExecutionContext, config: ActivationsConfig, storage: DdrStorage,
                compute: ComputeResource) -> dg.MaterializeResult:
    group = context.partition_key
    capture_config = to_core(config, CaptureConfig, asset="activations")
    performance = performance_args(config, asset="activations")  # checked before anything runs
    require_upstream(storage, "activations", group)
    upstream = upstream_versions(storage, group, required_by=f"activations[{group}]")
    layout = storage.layout
    report = compute.run_stage(context, "capture_group",
                               {"group": group, "config": capture_config.model_dump(mode="json"), **performance},
                               storage=storage, options=config.slurm)
    result = report["result"]
    summary = result["summary"]
    root = resolve_in_data_root(layout.data_root, result["root"])
    if not summary.get("complete"):
        raise dg.Failure(
            description=f"shard {capture_config.shard_index}/{capture_config.num_shards} finished its "
                        f"batches; the capture of {group!r} completes when every shard has run "
                        f"(re-run any shard afterwards to finalize)",
            metadata={"batches_written": len(result["batches_done"])},
        )
    upstream = loaded_versions(context, upstream, summary.get("inputs") or {})
    run_config = capture_config.model_dump(mode="json")
    data_version = config_hash({"plan": summary["plan"]["plan_hash"], "generations": summary["generations"],
                                "channels": summary["channels"], "upstream": upstream})
    write_record(layout.records_dir, make_record(
        "activations", group, ACTIVATIONS_CODE_VERSION, run_config, upstream, data_version,
        outputs={"root": result["root"], "generations": summary["generations"],
                 "timesteps": summary["timesteps"], "channels": summary["channels"]},
    ))
    images = sorted((root / "images").glob("*.png"))[:6]
    return dg.MaterializeResult(
        metadata={
            "path": path_metadata(root),
            "generations": summary["generations"],
            "prompts": summary["n_prompts"],
            "timesteps": len(summary["timesteps"]),
            "channels_per_variant": dg.MetadataValue.json(summary["channels"]),
            "bytes_written": summary["bytes"],
            "batches_written_this_run": len(result["batches_done"]),
            "batches_resumed": len(result["batches_skipped"]),
            "seconds_per_image": round(result["seconds_per_image"], 4) if result["images"] else 0.0,
            "base_seed": summary["plan"]["base_seed"],
            "preview": image_preview(images),
            **lineage_metadata(run_config, upstream, ACTIVATIONS_CODE_VERSION),
            **compute_metadata(report),
        },
        data_version=dg.DataVersion(data_version),
    )
