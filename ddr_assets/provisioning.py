"""Provisioning assets: models, SAEs and prompt datasets, one partition per configured entry.

Each materialization downloads (HF hub, Google Drive), copies (local path) or builds (embedded tiny
model) the entry into ``<data_root>/assets/...``, skipping the work when an intact copy is present and
re-fetching only the missing or damaged files of a partial one. The content hash becomes the Dagster
data version, so downstream assets turn stale when a provisioned input changes.
"""


import dagster as dg

from ddr_assets.lineage import lineage_metadata, path_metadata, table_preview
from ddr_assets.partitions import model_partitions, project, prompt_dataset_partitions, sae_partitions
from ddr_core import catalog
from ddr_core.paths import file_inside
from ddr_core.records import make_record, write_record
from ddr_resources.resources import DdrStorage

PROVISIONING_CODE_VERSION = "1"


def _provision(context: dg.AssetExecutionContext, storage: DdrStorage, kind: catalog.EntryKind,
               asset_name: str) -> tuple[dict, object]:
    name = context.partition_key
    cfg = storage.project
    layout = storage.layout
    source = catalog.entry_source(cfg, kind, name)
    context.log.info(f"provisioning {kind} {name!r} from {source.describe()} into {catalog.entry_dir(layout, kind, name)}")
    result = catalog.provision_entry(cfg, layout, kind, name, log=context.log.info)
    entry_config = {"kind": kind, "name": name, "source": source.model_dump(mode="json", exclude_none=True)}
    write_record(layout.provisioning_records_dir, make_record(
        asset=asset_name, partition=name, code_version=PROVISIONING_CODE_VERSION, config=entry_config,
        upstream={}, data_version=result.content_hash,
        outputs={"path": layout.relative(result.path), "n_files": result.n_files, "n_bytes": result.n_bytes},
    ))
    metadata = {
        "path": path_metadata(result.path),
        "source": source.describe(),
        "file_count": result.n_files,
        "size_bytes": result.n_bytes,
        "size_mb": round(result.n_bytes / 2**20, 3),
        "content_hash": result.content_hash,
        "skipped_intact_copy": result.skipped,
        "fetched_files": len(result.fetched),
        "refetched_files": dg.MetadataValue.json(list(result.refetched)),
        **lineage_metadata(entry_config, {}, PROVISIONING_CODE_VERSION),
    }
    return metadata, result


@dg.asset(
    partitions_def=model_partitions(),
    group_name="provisioning",
    code_version=PROVISIONING_CODE_VERSION,
    kinds={"huggingface", "pytorch"},
    description="A diffusers Stable Diffusion folder (HF hub, Google Drive, local path or the built-in tiny model).",
)
def models(context: dg.AssetExecutionContext, storage: DdrStorage) -> dg.MaterializeResult:
    metadata, result = _provision(context, storage, "model", "models")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(result.content_hash))


@dg.asset(
    partitions_def=sae_partitions(),
    group_name="provisioning",
    code_version=PROVISIONING_CODE_VERSION,
    kinds={"huggingface", "pytorch"},
    description="A SAeUron-format sparse autoencoder (cfg.json + sae.safetensors per layer).",
)
def saes(context: dg.AssetExecutionContext, storage: DdrStorage) -> dg.MaterializeResult:
    metadata, result = _provision(context, storage, "sae", "saes")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(result.content_hash))


@dg.asset(
    partitions_def=prompt_dataset_partitions(),
    group_name="provisioning",
    code_version=PROVISIONING_CODE_VERSION,
    kinds={"json"},
    description="A prompt dataset (JSONL with a text field, or one prompt per line); "
                "unique prompts in a stable order, invalid lines counted.",
)
def prompt_datasets(context: dg.AssetExecutionContext, storage: DdrStorage) -> dg.MaterializeResult:
    from ddr_core.prompts import load_prompts

    metadata, result = _provision(context, storage, "prompts", "prompt_datasets")
    dataset = project().prompt_datasets[context.partition_key]
    prompt_file = file_inside(result.path, dataset.file, f"prompt_datasets.{context.partition_key}.file")
    prompts = load_prompts(prompt_file, text_field=dataset.text_field)
    if prompts.invalid:
        context.log.warning(f"{len(prompts.invalid)} invalid line(s) in {dataset.file}; first: "
                            f"{[f'line {i.line}: {i.reason}' for i in prompts.invalid[:5]]}")
    metadata.update({
        "unique_prompts": len(prompts.texts),
        "lines": prompts.n_lines,
        "invalid_lines": len(prompts.invalid),
        "duplicate_prompts": prompts.n_duplicates,
        "preview": table_preview([{"#": i, "prompt": t} for i, t in enumerate(prompts.texts[:10])]),
    })
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(result.content_hash))


PROVISIONING_ASSETS = [models, saes, prompt_datasets]
