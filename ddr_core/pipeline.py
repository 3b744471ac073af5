"""Loading a local Stable Diffusion folder and addressing its layers.

Everything here works offline on a diffusers-format folder (``model_index.json`` plus one folder
per component, weights as safetensors). Problems with the folder surface as
:class:`ModelFolderError` naming the component or file and the fix, before diffusers gets to
fail with a less helpful message.
"""

from __future__ import annotations

import difflib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

REQUIRED_COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": (),
    "scheduler": ("scheduler_config.json",),
}
"""Component folder -> files that must exist in it (weights are checked separately)."""

_WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
_REPROVISION_HINT = (
    "Re-provision the model: download/copy the complete diffusers folder again "
    "(or rebuild the embedded tiny model with ddr_core.tiny_model.build_tiny_pipeline)."
)


class ModelFolderError(FileNotFoundError):
    """A model folder is missing a component or file, or a weights file is corrupt."""


class LayerNotFoundError(ValueError):
    """A dotted layer name does not exist in a module; the message lists the closest valid names."""


def _header_end(header: object) -> int:
    """The end of the data the safetensors ``header`` describes; ``ValueError`` when it is not shaped as the
    format says (an object of tensor name -> object with a ``data_offsets`` pair of byte offsets)."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object of tensor entries")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict):
                raise ValueError(f"__metadata__ is a JSON {type(entry).__name__}, not an object")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {key[:80]!r} has no valid data_offsets (two byte offsets, start <= end)")
        end = max(end, offsets[1])
    return end


def _check_safetensors_file(path: Path, component: str) -> None:
    """Validate a safetensors header and that the file holds every byte the header promises.

    Reads only the header, so multi-GB checkpoints are checked in microseconds.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > size - 8:
                raise ValueError(f"header claims {header_length} bytes but the file has {size}")
            data_end = _header_end(json.loads(handle.read(header_length)))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ModelFolderError(
            f"Weights file {path} of component {component!r} is corrupt ({error}). {_REPROVISION_HINT}"
        ) from error
    if 8 + header_length + data_end > size:
        raise ModelFolderError(
            f"Weights file {path} of component {component!r} is truncated: it has {size} bytes, the "
            f"header needs {8 + header_length + data_end}. {_REPROVISION_HINT}"
        )


def _check_json_object(path: Path, what: str) -> None:
    """``path`` must hold a JSON object (diffusers / transformers read these and fail obscurely otherwise)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ModelFolderError(f"{what} {path} is not valid JSON ({error}). {_REPROVISION_HINT}") from error
    if not isinstance(value, dict):
        raise ModelFolderError(
            f"{what} {path} holds a JSON {type(value).__name__}, not an object. {_REPROVISION_HINT}"
        )


def check_model_index(model_dir: str | Path) -> dict:
    """The folder's ``model_index.json`` as a dict, after checking the folder exists and the file is a JSON object.

    Raises:
        ModelFolderError: naming the missing folder / file or the malformed index, with the fix.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelFolderError(f"Model folder {root} does not exist. {_REPROVISION_HINT}")
    if not (root / "model_index.json").is_file():
        raise ModelFolderError(f"Model folder {root} has no model_index.json. {_REPROVISION_HINT}")
    _check_json_object(root / "model_index.json", "Model index")
    return json.loads((root / "model_index.json").read_text(encoding="utf-8"))


def _check_tokenizer_folder(folder: Path, component: str, root: Path) -> None:
    has_files = (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    if not has_files:
        raise ModelFolderError(
            f"Component {component!r} of {root} has neither tokenizer.json nor vocab.json + merges.txt (nor "
            f"spiece.model). {_REPROVISION_HINT}"
        )


def _check_weights_folder(folder: Path, component: str, root: Path) -> None:
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        extra = (
            f" Only pickle weights ({', '.join(pickled)}) are present; ddr loads safetensors only, "
            "convert them or fetch the safetensors files."
            if pickled
            else ""
        )
        raise ModelFolderError(
            f"Component {component!r} of {root} has no *.safetensors weights.{extra} {_REPROVISION_HINT}"
        )
    for index in sorted(folder.glob("*.safetensors.index.json")):  # a sharded checkpoint names its shards
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        missing = [s for s in shards if not isinstance(s, str) or not (folder / s).is_file()]
        if missing:
            raise ModelFolderError(
                f"Component {component!r} of {root}: {index.name} names shard(s) {missing[:3]} that are "
                f"missing. {_REPROVISION_HINT}"
            )
    for weights_file in weights:
        _check_safetensors_file(weights_file, component)


def check_model_folder(
    model_dir: str | Path,
    components: dict[str, tuple[str, ...]] = REQUIRED_COMPONENTS,
    weighted: tuple[str, ...] = _WEIGHTED_COMPONENTS,
) -> Path:
    """Check that ``model_dir`` is a complete diffusers folder with intact safetensors weights: each folder of
    ``components`` (component -> files that must exist in it; default Stable Diffusion's) exists with those
    files, its JSON files are objects, a ``tokenizer*`` folder holds tokenizer files, and each ``weighted``
    component has safetensors weights whose headers (and sharded index) are intact. Every family's
    :meth:`~ddr_core.families.ModelFamily.check_folder` calls this with its own components.

    Raises:
        ModelFolderError: naming the missing component folder / file or the corrupt weights file.
    """
    root = Path(model_dir)
    check_model_index(root)
    for component, required_files in components.items():
        folder = root / component
        if not folder.is_dir():
            raise ModelFolderError(
                f"Model folder {root} is missing the component folder {component!r}. {_REPROVISION_HINT}"
            )
        for name in required_files:
            if not (folder / name).is_file():
                raise ModelFolderError(
                    f"Component {component!r} of {root} is missing {name}. {_REPROVISION_HINT}"
                )
        for json_file in sorted(folder.glob("*.json")):
            _check_json_object(json_file, f"File of component {component!r}")
        if component.startswith("tokenizer"):
            _check_tokenizer_folder(folder, component, root)
        if component in weighted:
            _check_weights_folder(folder, component, root)
    return root


def check_provisioned_model(model_dir: str | Path) -> str | None:
    """The model folder's content hash after checking it against its provisioning manifest (``None``: no
    manifest; see :func:`ddr_core.provisioning.verify_provisioned`).

    Raises:
        ModelFolderError: a file changed, missing or added since provisioning (named, with the fix).
    """
    from ddr_core.provisioning import ProvisionedFolderChangedError, verify_provisioned

    root = Path(model_dir)
    if not root.is_dir():
        raise ModelFolderError(f"Model folder {root} does not exist. {_REPROVISION_HINT}")
    try:
        return verify_provisioned(root, what="Model folder")
    except ProvisionedFolderChangedError as error:
        raise ModelFolderError(str(error)) from None


def reprovision_hint() -> str:
    """The fix for a broken model folder (used in every :class:`ModelFolderError`)."""
    return _REPROVISION_HINT


def load_diffusers_folder(pipeline_class: Any, root: Path, device: str | torch.device, dtype: torch.dtype,
                          **components: Any) -> Any:
    """``pipeline_class.from_pretrained(root)`` offline, safetensors only, progress bar off, every module in eval
    mode on ``device`` with ``dtype`` (``components``: extra keyword arguments, e.g. ``safety_checker=None``).

    Raises:
        ModelFolderError: diffusers / transformers could not load the folder (the cause is kept).
    """
    from diffusers.pipelines import pipeline_utils

    # diffusers >= 0.36 renamed torch_dtype to dtype (the old name warns).
    dtype_keyword = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    try:
        pipe = pipeline_class.from_pretrained(
            root, **{dtype_keyword: dtype}, local_files_only=True, low_cpu_mem_usage=False, use_safetensors=True,
            **components,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelFolderError(
            f"Could not load the pipeline from {root}: {error}. {_REPROVISION_HINT}"
        ) from error
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval()
    return pipe


def load_pipeline(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """The diffusers pipeline of a local model folder of any supported family (offline, safetensors only):
    ``load_model(...).pipe`` (see :func:`ddr_core.families.load_model`).

    A provisioned folder is first checked against its manifest (:func:`check_provisioned_model`): a weights
    or config file changed, missing or added since provisioning is an error naming it and the command that
    re-provisions. A folder without a manifest (built in a test, copied by hand) loads with a warning.

    Raises:
        ModelFolderError: for a missing component folder/file, a truncated/corrupt weights file, or a folder
            that no longer matches its provisioning manifest.
    """
    from ddr_core.families import load_model

    return load_model(model_dir, device=device, dtype=dtype).pipe


def resolve_layer(root_module: nn.Module, dotted_name: str) -> nn.Module:
    """The submodule called ``dotted_name`` in ``root_module.named_modules()``.

    Raises:
        LayerNotFoundError: listing the closest valid names.
    """
    modules = dict(root_module.named_modules())
    if dotted_name in modules and dotted_name != "":
        return modules[dotted_name]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(dotted_name, names, n=5, cutoff=0.6)
    if not close:
        prefix = dotted_name.split(".")[0]
        close = [name for name in names if name.startswith(prefix) and name.count(".") <= 2][:5]
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    raise LayerNotFoundError(
        f"Layer {dotted_name!r} does not exist in {type(root_module).__name__}.{hint} "
        "Use a dotted name from named_modules(), e.g. 'up_blocks.1.attentions.1'."
    )
