"""Top-k SAEs in the sdxl-unbox format ("Unpacking SDXL Turbo", github surkovv/sdxl-unbox; hub
``surokpro2/sdxl-saes``).

Their SAEs read the **residual update** of a transformer block of SDXL-Turbo's UNet (the block's output minus
its input, per spatial position, ``d_model`` channels) and have ``n_dirs`` features (5,120 for the published
``k10_hidden5120`` checkpoints on ``down_blocks.2.attentions.1``, ``mid_block.attentions.0``,
``up_blocks.0.attentions.0`` and ``up_blocks.0.attentions.1``).

On disk, one folder per block, named ``unet.<block>_k<k>_hidden<n_dirs>_auxk<auxk>_bs<batch>_lr<lr>/final/``,
holding

* ``config.json``: ``{"n_dirs_local", "d_model", "k", "auxk", "dead_steps_threshold"}``;
* ``state_dict.pth``: ``torch.save({"state_dict": state_dict})`` with ``encoder.weight (n_dirs, d_model)``
  (no bias), ``decoder.weight (d_model, n_dirs)`` (unit-norm columns: feature ``f``'s direction is column ``f``),
  ``pre_bias (d_model,)``, ``latent_bias (n_dirs,)`` and the training counter ``stats_last_nonzero (n_dirs,)``;
* ``mean.pt`` / ``std.pt``: per-feature statistics their demo scales interventions with (not needed here).

ddr reads ``state_dict.safetensors`` when present (same keys), else ``state_dict.pth`` through
:mod:`ddr_core.torch_zip` (its tensors are read without unpickling). A feature's activation is its pre-top-k
value ``relu(encoder(x - pre_bias) + latent_bias)`` (their ``encode`` keeps the ``k`` largest of those).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddr_core.atomic import widen_to_umask
from ddr_core.basis import SaeFeatureBasis
from ddr_core.sae import SaeFormatError

CONFIG_FILENAME = "config.json"
SAFETENSORS_FILENAME = "state_dict.safetensors"
PICKLE_FILENAME = "state_dict.pth"
MAX_CONFIG_BYTES = 1 << 16


@dataclass(frozen=True)
class UnboxSaeConfig:
    """``config.json`` of an sdxl-unbox SAE."""

    n_dirs_local: int
    d_model: int
    k: int
    auxk: int | None = None
    dead_steps_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("n_dirs_local", "d_model", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SaeFormatError(f"sdxl-unbox config field {name!r} must be a positive integer, got {value!r}")
        if self.k > self.n_dirs_local:
            raise SaeFormatError(f"sdxl-unbox config has k={self.k} larger than n_dirs_local={self.n_dirs_local}")

    @classmethod
    def from_json_dict(cls, data: Any) -> UnboxSaeConfig:
        if not isinstance(data, dict):
            raise SaeFormatError(f"sdxl-unbox config.json must hold a JSON object, got {type(data).__name__}")
        missing = [name for name in ("n_dirs_local", "d_model", "k") if name not in data]
        if missing:
            raise SaeFormatError(f"sdxl-unbox config.json is missing {', '.join(missing)}")
        auxk = data.get("auxk")
        return cls(n_dirs_local=data["n_dirs_local"], d_model=data["d_model"], k=data["k"],
                   auxk=auxk if isinstance(auxk, int) and not isinstance(auxk, bool) else None,
                   dead_steps_threshold=int(data.get("dead_steps_threshold") or 0))


def unbox_folder_name(layer_name: str, config: UnboxSaeConfig, batch_size: int = 4096, lr: str = "0.0001") -> str:
    """sdxl-unbox's checkpoint folder name of a block: ``unet.<layer>_k<k>_hidden<n>_auxk<a>_bs<b>_lr<lr>``."""
    return (f"unet.{layer_name}_k{config.k}_hidden{config.n_dirs_local}_auxk{config.auxk or 0}"
            f"_bs{batch_size}_lr{lr}")


class UnboxSae(nn.Module):
    """An sdxl-unbox SAE (its parameter names and shapes; inference only)."""

    def __init__(self, config: UnboxSaeConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        n, d = config.n_dirs_local, config.d_model
        self.encoder = nn.Linear(d, n, bias=False, device=device, dtype=dtype)
        self.decoder = nn.Linear(n, d, bias=False, device=device, dtype=dtype)
        self.pre_bias = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.latent_bias = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.register_buffer("stats_last_nonzero", torch.zeros(n, dtype=torch.long, device=device))

    @property
    def d_in(self) -> int:
        return self.config.d_model

    @property
    def num_latents(self) -> int:
        return self.config.n_dirs_local

    @classmethod
    def random(cls, d_model: int, n_dirs: int, k: int, seed: int = 0) -> UnboxSae:
        """A seeded random SAE (tied init, unit-norm decoder columns, small biases) for tests and tiny models."""
        sae = cls(UnboxSaeConfig(n_dirs_local=n_dirs, d_model=d_model, k=k, auxk=min(256, n_dirs),
                                 dead_steps_threshold=100))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(n_dirs, d_model, generator=generator) / d_model**0.5
            sae.encoder.weight.copy_(weight)
            sae.decoder.weight.copy_((weight / weight.norm(dim=1, keepdim=True)).T)
            sae.pre_bias.copy_(0.01 * torch.randn(d_model, generator=generator))
            sae.latent_bias.copy_(0.01 * torch.randn(n_dirs, generator=generator))
        return sae

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``encoder(x - pre_bias) + latent_bias``: ``(..., d_model) -> (..., n_dirs)``."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"sdxl-unbox SAE expects d_model={self.d_in} channels, got shape {tuple(x.shape)}")
        x = x.to(device=self.pre_bias.device, dtype=self.pre_bias.dtype)
        return self.encoder(x - self.pre_bias) + self.latent_bias

    def feature_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-top-k feature activations ``relu(pre_activations(x))``."""
        return torch.relu(self.pre_activations(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Their ``encode``: the ``k`` largest pre-activations kept (relu), the rest zero."""
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents) + self.pre_bias


def save_unbox_sae(sae: UnboxSae, folder: str | Path) -> Path:
    """Write ``config.json`` and ``state_dict.safetensors`` (the state dict's keys and shapes) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().contiguous().cpu() for name, value in sae.state_dict().items()}
    tmp = folder / (SAFETENSORS_FILENAME + ".part")
    save_file(tensors, str(tmp))
    widen_to_umask(tmp)  # safetensors writes 0600 whatever the umask
    os.replace(tmp, folder / SAFETENSORS_FILENAME)
    (folder / CONFIG_FILENAME).write_text(json.dumps(asdict(sae.config)), encoding="utf-8")
    return folder


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ddr_core.torch_zip import UnsupportedCheckpointError, read_torch_zip_tensors

    if (folder / SAFETENSORS_FILENAME).is_file():
        try:
            return load_file(str(folder / SAFETENSORS_FILENAME), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise SaeFormatError(f"sdxl-unbox SAE weights {folder / SAFETENSORS_FILENAME} are corrupt ({error}); "
                                 "re-provision the SAE") from error
    if (folder / PICKLE_FILENAME).is_file():
        try:
            saved = read_torch_zip_tensors(folder / PICKLE_FILENAME)
        except UnsupportedCheckpointError as error:
            raise SaeFormatError(f"sdxl-unbox SAE weights: {error}; re-provision the SAE") from error
        state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
        if not isinstance(state, dict):
            raise SaeFormatError(f"{folder / PICKLE_FILENAME} holds no state dict (expected "
                                 "{'state_dict': {...}} as sdxl-unbox saves it)")
        return state
    raise SaeFormatError(f"sdxl-unbox SAE folder {folder} has neither {SAFETENSORS_FILENAME} nor {PICKLE_FILENAME}; "
                         "re-provision the SAE")


def load_unbox_sae(folder: str | Path, expected_d_in: int | None = None, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> UnboxSae:
    """Load an sdxl-unbox SAE folder (``config.json`` + weights), checking every tensor's shape.

    Raises:
        SaeFormatError: a missing / corrupt file, a missing or misshapen tensor, or ``d_model`` not the layer's
            width ``expected_d_in``.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILENAME
    if not config_path.is_file():
        raise SaeFormatError(f"sdxl-unbox SAE file {config_path} does not exist; re-provision the SAE")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise SaeFormatError(f"sdxl-unbox SAE config {config_path} is larger than a config; re-provision the SAE")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise SaeFormatError(f"sdxl-unbox SAE config {config_path} is not valid JSON ({error})") from error
    config = UnboxSaeConfig.from_json_dict(raw)
    if expected_d_in is not None and config.d_model != expected_d_in:
        raise SaeFormatError(f"sdxl-unbox SAE in {folder} has d_model={config.d_model} but the hooked layer has "
                             f"width {expected_d_in}; this SAE was trained for another layer or model")
    state = _read_state_dict(folder)
    n, d = config.n_dirs_local, config.d_model
    shapes = {"encoder.weight": (n, d), "decoder.weight": (d, n), "pre_bias": (d,), "latent_bias": (n,)}
    missing = [name for name in shapes if name not in state]
    if missing:
        raise SaeFormatError(f"sdxl-unbox SAE weights in {folder} lack tensor(s): {', '.join(missing)}")
    wrong = [f"{name} {tuple(state[name].shape)} != {shape}" for name, shape in shapes.items()
             if tuple(state[name].shape) != shape]
    if wrong:
        raise SaeFormatError(f"sdxl-unbox SAE weights in {folder} do not match its config.json: {'; '.join(wrong)}")
    sae = UnboxSae(config, device=device, dtype=dtype)
    with torch.no_grad():
        for name in shapes:
            sae.get_parameter(name).copy_(state[name].float())
    return sae.eval()


_SUFFIX = re.compile(r"^_k\d+_hidden\d+_auxk\d+_bs\d+_lr[0-9.e-]+$")


def find_unbox_folder(root: str | Path, layer_name: str) -> Path:
    """The sdxl-unbox SAE folder of ``layer_name`` under ``root``: ``root`` itself (a folder with
    ``config.json``), ``unet.<layer>_<suffix>/final/`` or ``unet.<layer>_<suffix>/`` (their layout), or
    ``unet.<layer>/`` / ``<layer>/`` (with or without ``final/``). Links leading outside ``root`` are refused.

    Raises:
        SaeFormatError: none found (the folders that exist are listed), or several checkpoints of the layer.
    """
    from ddr_core.paths import check_name, file_inside

    check_name(layer_name, "layer")
    from ddr_core.provisioning import ProvisionedFolderChangedError, verify_provisioned

    root = Path(root)
    if not root.is_dir():
        raise SaeFormatError(f"SAE root {root} does not exist; re-provision the SAE checkpoints")
    try:
        verify_provisioned(root, what="SAE folder")
    except ProvisionedFolderChangedError as error:
        raise SaeFormatError(str(error)) from None
    if (root / CONFIG_FILENAME).is_file():
        return root
    matches: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        name = child.name
        exact = name in (f"unet.{layer_name}", layer_name)
        suffixed = name.startswith(f"unet.{layer_name}_") and _SUFFIX.match(name[len(f"unet.{layer_name}"):])
        if exact or suffixed:
            for candidate in (child / "final", child):
                if (candidate / CONFIG_FILENAME).is_file():
                    matches.append(candidate)
                    break
    if len(matches) > 1:
        raise SaeFormatError(f"SAE root {root} holds several sdxl-unbox checkpoints of {layer_name!r}: "
                             f"{[str(m.relative_to(root)) for m in matches]}; keep one (allow_patterns)")
    if not matches:
        found = sorted(str(p.parent.relative_to(root)) for p in root.glob(f"*/{CONFIG_FILENAME}"))
        found += sorted(str(p.parent.relative_to(root)) for p in root.glob(f"*/final/{CONFIG_FILENAME}"))
        raise SaeFormatError(f"no sdxl-unbox SAE for layer {layer_name!r} under {root}; found: {found or 'none'}")
    folder = matches[0]
    relative = folder.relative_to(root).as_posix()
    for name in (CONFIG_FILENAME, SAFETENSORS_FILENAME, PICKLE_FILENAME):
        if (folder / name).exists():
            file_inside(root, f"{relative}/{name}", f"SAE file {name} of {root}")
    return folder


class UnboxSaeBasis(SaeFeatureBasis):
    """The features of an sdxl-unbox SAE (:class:`ddr_core.sae_unbox.UnboxSae`), read on the block's residual
    update. A feature's activation is its pre-top-k ``relu(W_enc[f] . (x - pre_bias) + latent_bias[f])``, its
    pre-activation the same without the ReLU; its steering direction is its decoder column
    ``decoder.weight[:, f]`` (unit norm)."""

    kind = "sdxl-unbox"
    required_hook = "residual"  # their SAEs read the block's update, output minus input

    @classmethod
    def load(cls, sae_dir: Any, layer_name: str, layer_width: int, device: torch.device | str) -> UnboxSaeBasis:
        folder = find_unbox_folder(sae_dir, layer_name)
        return cls(load_unbox_sae(folder, expected_d_in=layer_width, device=device, dtype=torch.float32))

    def reduce(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.sae.feature_activations(tokens).mean(dim=1)

    def _pre(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """``(n, positions)``: each element's feature before the ReLU, per position."""
        units = units.to(self.sae.pre_bias.device)
        weight = self.sae.encoder.weight[units]  # (n, d)
        bias = self.sae.latent_bias[units]  # (n,)
        inputs = tokens.to(dtype=weight.dtype, device=weight.device) - self.sae.pre_bias
        return torch.einsum("bnd,bd->bn", inputs, weight) + bias[:, None]

    def directions(self, units: Sequence[int] | torch.Tensor) -> torch.Tensor:
        index = self.check_units(units).to(self.sae.pre_bias.device)
        with torch.no_grad():
            return self.sae.decoder.weight[:, index].T.detach().float().cpu()
