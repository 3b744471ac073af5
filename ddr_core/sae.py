"""Top-k sparse autoencoders in the SAeUron / EleutherAI ``sae`` on-disk format.

One SAE lives in one folder, conventionally named ``unet.<layer name>/`` (for example
``unet.up_blocks.1.attentions.1/``), holding two files:

* ``cfg.json`` -- ``d_in``, ``expansion_factor`` or ``num_latents`` (``num_latents == 0`` means
  ``d_in * expansion_factor``), ``k``, ``normalize_decoder`` and optional extras such as
  ``multi_topk`` or ``input_unit_norm``. Unknown keys are ignored.
* ``sae.safetensors`` -- ``encoder.weight`` ``(num_latents, d_in)``, ``encoder.bias``
  ``(num_latents,)``, ``W_dec`` ``(num_latents, d_in)`` and ``b_dec`` ``(d_in,)``.

The analysed quantity is the pre-top-k feature activation
``relu(encoder(x - b_dec))``, computed per spatial position of a UNet block output whose
channel dimension is ``d_in``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ddr_core.atomic import widen_to_umask

CONFIG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
FOLDER_PREFIX = "unet."
_UNIT_NORM_EPS = 1e-5


class SaeFormatError(ValueError):
    """An SAE folder is missing, corrupt, or inconsistent with its config or the model layer."""


@dataclass(frozen=True)
class SaeConfig:
    """Shape and sparsity settings of one top-k SAE.

    Attributes:
        d_in: Width of the activations the SAE reads (channels of the hooked UNet block).
        num_latents: Number of dictionary features (resolved; never 0 here).
        k: Number of features kept by the top-k in the reconstruction path.
        normalize_decoder: Whether decoder rows were trained with unit norm.
        expansion_factor: ``num_latents / d_in`` as stored (informational).
        multi_topk: Training flag stored by the EleutherAI library (informational).
        input_unit_norm: SAeUron option: standardise each input vector (zero mean, unit std
            over ``d_in``) before encoding. Applied by :meth:`Sae.feature_activations`.
    """

    d_in: int
    num_latents: int
    k: int
    normalize_decoder: bool = True
    expansion_factor: int = 0
    multi_topk: bool = False
    input_unit_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("d_in", "num_latents", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SaeFormatError(f"SAE config field {name!r} must be a positive integer, got {value!r}.")
        if self.k > self.num_latents:
            raise SaeFormatError(f"SAE config has k={self.k} larger than num_latents={self.num_latents}.")

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> SaeConfig:
        """Build a config from a parsed ``cfg.json`` dict; unknown keys are ignored.

        Raises:
            SaeFormatError: naming every missing required field.
        """
        if not isinstance(data, dict):
            raise SaeFormatError(f"SAE cfg.json must hold a JSON object, got {type(data).__name__}.")
        missing = [name for name in ("d_in", "k") if name not in data]
        num_latents = data.get("num_latents") or 0
        expansion_factor = data.get("expansion_factor") or 0
        if not num_latents and not expansion_factor:
            missing.append("num_latents or expansion_factor")
        if missing:
            raise SaeFormatError(f"SAE cfg.json is missing required field(s): {', '.join(missing)}.")
        for name, value in (("d_in", data["d_in"]), ("k", data["k"]), ("num_latents", num_latents),
                            ("expansion_factor", expansion_factor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SaeFormatError(f"SAE cfg.json field {name!r} must be a whole number, got {value!r}.")
        d_in = data["d_in"]
        if not num_latents and isinstance(d_in, int) and isinstance(expansion_factor, int):
            num_latents = d_in * expansion_factor
        if not expansion_factor and isinstance(d_in, int) and d_in > 0 and num_latents % d_in == 0:
            expansion_factor = num_latents // d_in
        return cls(
            d_in=d_in,
            num_latents=num_latents,
            k=data["k"],
            normalize_decoder=bool(data.get("normalize_decoder", True)),
            expansion_factor=expansion_factor,
            multi_topk=bool(data.get("multi_topk", False)),
            input_unit_norm=bool(data.get("input_unit_norm", False)),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """Plain dict in the ``cfg.json`` layout (round-trips through :meth:`from_json_dict`)."""
        return asdict(self)


class Sae(nn.Module):
    """A top-k sparse autoencoder over ``d_in``-wide activation vectors.

    Parameters:
        encoder: ``nn.Linear(d_in, num_latents)``; weight ``(num_latents, d_in)``, bias ``(num_latents,)``.
        W_dec: decoder dictionary ``(num_latents, d_in)``; row ``i`` is feature ``i``'s direction.
        b_dec: decoder bias ``(d_in,)``, also subtracted from the input before encoding.
    """

    def __init__(
        self, cfg: SaeConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(torch.zeros(cfg.num_latents, cfg.d_in, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @classmethod
    def random(
        cls, d_in: int, num_latents: int, k: int, seed: int = 0, normalize_decoder: bool = True
    ) -> Sae:
        """A deterministic randomly initialised SAE (float32, CPU) for tests and tiny pipelines.

        Encoder rows are Gaussian / sqrt(d_in); the decoder is the encoder weight (unit-norm
        rows when ``normalize_decoder``); biases are small Gaussian values so every term matters.
        """
        cfg = SaeConfig(
            d_in=d_in,
            num_latents=num_latents,
            k=k,
            normalize_decoder=normalize_decoder,
            expansion_factor=num_latents // d_in if num_latents % d_in == 0 else 0,
        )
        generator = torch.Generator().manual_seed(seed)
        sae = cls(cfg)
        with torch.no_grad():
            weight = torch.randn(num_latents, d_in, generator=generator) / d_in**0.5
            sae.encoder.weight.copy_(weight)
            sae.encoder.bias.copy_(0.01 * torch.randn(num_latents, generator=generator))
            decoder = weight.clone()
            if normalize_decoder:
                decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)
            sae.W_dec.copy_(decoder)
            sae.b_dec.copy_(0.01 * torch.randn(d_in, generator=generator))
        return sae

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked for ``d_in``, on the SAE's device and dtype, unit-normalised when the config says so."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"SAE expects inputs with last dimension d_in={self.cfg.d_in}, got shape {tuple(x.shape)}."
            )
        x = x.to(dtype=self.b_dec.dtype, device=self.b_dec.device)
        if self.cfg.input_unit_norm:
            mean = x.mean(dim=-1, keepdim=True)
            centred = x - mean
            x = centred / (centred.std(dim=-1, keepdim=True) + _UNIT_NORM_EPS)
        return x

    def feature_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-top-k feature activations ``relu(encoder(x - b_dec))``.

        Args:
            x: activations ``(..., d_in)``.

        Returns:
            ``(..., num_latents)``, non-negative.
        """
        return torch.relu(self.encoder(self.prepare_input(x) - self.b_dec))

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest feature activations per input vector.

        Args:
            x: activations ``(..., d_in)``.

        Returns:
            ``(values, indices)``, each ``(..., k)``; values descending.
        """
        result = self.feature_activations(x).topk(self.cfg.k, dim=-1, sorted=True)
        return result.values, result.indices

    def decode(self, top_values: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
        """Reconstruct from sparse codes: ``sum_j top_values[..., j] * W_dec[top_indices[..., j]] + b_dec``.

        Args:
            top_values: ``(..., k)`` activation values.
            top_indices: ``(..., k)`` feature indices (long).

        Returns:
            ``(..., d_in)``.
        """
        if top_values.shape != top_indices.shape:
            raise ValueError(
                f"top_values {tuple(top_values.shape)} and top_indices {tuple(top_indices.shape)} differ in shape."
            )
        rows = self.W_dec[top_indices]  # (..., k, d_in)
        return (top_values.to(self.W_dec.dtype).unsqueeze(-1) * rows).sum(dim=-2) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the top-k bottleneck; ``(..., d_in) -> (..., d_in)``."""
        values, indices = self.topk(x)
        return self.decode(values, indices)

    def _check_features(self, features: torch.Tensor) -> torch.Tensor:
        features = torch.as_tensor(features, dtype=torch.long, device=self.W_dec.device)
        if features.ndim != 1:
            raise ValueError(
                f"features must be a 1-D tensor of feature indices, got shape {tuple(features.shape)}."
            )
        if features.numel() and (int(features.min()) < 0 or int(features.max()) >= self.cfg.num_latents):
            raise IndexError(
                f"feature indices must be in [0, {self.cfg.num_latents}), got {features.tolist()}."
            )
        return features

    def decoder_directions(self, features: torch.Tensor) -> torch.Tensor:
        """Decoder rows of the chosen features: ``(n,) -> (n, d_in)``."""
        return self.W_dec[self._check_features(features)]

    def encoder_rows(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder weight rows and biases of the chosen features.

        With ``weight, bias = encoder_rows(f)``, ``relu((x - b_dec) @ weight.T + bias)`` equals
        ``feature_activations(x)[..., f]`` (for ``input_unit_norm`` configs normalise ``x`` first).

        Returns:
            ``(weight (n, d_in), bias (n,))``.
        """
        features = self._check_features(features)
        return self.encoder.weight[features], self.encoder.bias[features]


def save_sae(sae: Sae, folder: str | Path) -> Path:
    """Write ``cfg.json`` and ``sae.safetensors`` into ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": sae.encoder.weight.detach().contiguous().cpu(),
        "encoder.bias": sae.encoder.bias.detach().contiguous().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    weights_tmp = folder / (WEIGHTS_FILENAME + ".part")
    save_file(tensors, str(weights_tmp))
    widen_to_umask(weights_tmp)  # safetensors writes 0600 whatever the umask
    os.replace(weights_tmp, folder / WEIGHTS_FILENAME)
    config_tmp = folder / (CONFIG_FILENAME + ".part")
    config_tmp.write_text(json.dumps(sae.cfg.to_json_dict(), indent=2), encoding="utf-8")
    os.replace(config_tmp, folder / CONFIG_FILENAME)
    return folder


def load_sae(
    folder: str | Path,
    expected_d_in: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Sae:
    """Load an SAE folder, validating files, tensor names and shapes.

    Args:
        folder: folder holding ``cfg.json`` and ``sae.safetensors``.
        expected_d_in: channel width of the model layer the SAE will read; checked against ``d_in``.

    Raises:
        SaeFormatError: on a missing/corrupt file, missing tensors, inconsistent shapes, or a
            ``d_in`` that does not match ``expected_d_in``.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILENAME
    weights_path = folder / WEIGHTS_FILENAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise SaeFormatError(f"SAE file {path} does not exist; re-provision the SAE checkpoints.")
    try:
        raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise SaeFormatError(
            f"SAE config {config_path} is not valid JSON ({error}); re-provision the SAE checkpoints."
        ) from error
    try:
        cfg = SaeConfig.from_json_dict(raw_config)
    except SaeFormatError as error:
        raise SaeFormatError(f"{config_path}: {error} Re-provision the SAE checkpoints.") from error
    if expected_d_in is not None and cfg.d_in != expected_d_in:
        raise SaeFormatError(
            f"SAE in {folder} has d_in={cfg.d_in} but the hooked layer has width {expected_d_in}; "
            f"this SAE was trained for a different layer or model."
        )
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SaeFormatError(
            f"SAE weights {weights_path} are corrupt or truncated ({error}); re-provision the SAE checkpoints."
        ) from error

    expected_shapes = {
        "encoder.weight": (cfg.num_latents, cfg.d_in),
        "encoder.bias": (cfg.num_latents,),
        "W_dec": (cfg.num_latents, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    missing = [name for name in expected_shapes if name not in tensors]
    if missing:
        raise SaeFormatError(f"SAE weights {weights_path} lack tensor(s): {', '.join(missing)}.")
    mismatched = [
        f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}"
        for name, shape in expected_shapes.items()
        if tuple(tensors[name].shape) != shape
    ]
    if mismatched:
        raise SaeFormatError(
            f"SAE weights {weights_path} do not match {config_path} "
            f"(d_in={cfg.d_in}, num_latents={cfg.num_latents}): {'; '.join(mismatched)}."
        )

    sae = Sae(cfg, device=device, dtype=dtype)
    with torch.no_grad():
        sae.encoder.weight.copy_(tensors["encoder.weight"])
        sae.encoder.bias.copy_(tensors["encoder.bias"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_dec.copy_(tensors["b_dec"])
    sae.eval()
    return sae


def _is_sae_folder(path: Path) -> bool:
    return (path / CONFIG_FILENAME).is_file()


def _inside(root: Path, folder: Path) -> Path:
    """``folder``, after checking that it and the SAE files in it resolve inside ``root`` (no link out)."""
    from ddr_core.paths import file_inside

    relative = folder.relative_to(root).as_posix()
    for name in (CONFIG_FILENAME, WEIGHTS_FILENAME):
        file_inside(root, name if relative == "." else f"{relative}/{name}", f"SAE file {name} of {root}")
    return folder


def find_sae_folder(root: str | Path, layer_name: str) -> Path:
    """Locate the SAE folder for a UNet layer.

    ``root`` may be the SAE folder itself, a parent holding ``unet.<layer_name>/`` (or
    ``<layer_name>/``), or a parent holding one more level of folders (e.g. a checkpoint name)
    that contains it. A provisioned ``root`` is first checked against its manifest
    (:func:`ddr_core.provisioning.verify_provisioned`; without one it is used with a warning).

    Raises:
        SaeFormatError: when not found, listing the SAE folders that do exist under ``root``; or when
            ``root`` no longer matches its provisioning manifest (naming the files and the fix).
        ddr_core.paths.UnsafePathError: ``layer_name`` is not a safe name, or the folder found (or its
            ``cfg.json`` / ``sae.safetensors``) is a link leading outside ``root``.
    """
    from ddr_core.paths import check_name
    from ddr_core.provisioning import ProvisionedFolderChangedError, verify_provisioned

    check_name(layer_name, "layer")  # the folder is named after it: no '/', '..', absolute path
    root = Path(root)
    if not root.is_dir():
        raise SaeFormatError(f"SAE root {root} does not exist; re-provision the SAE checkpoints.")
    try:
        verify_provisioned(root, what="SAE folder")
    except ProvisionedFolderChangedError as error:
        raise SaeFormatError(str(error)) from None
    names = [FOLDER_PREFIX + layer_name, layer_name]
    if root.name in names and _is_sae_folder(root):
        return _inside(root, root)
    candidates = [root / name for name in names]
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        candidates.extend(child / name for name in names)
    for candidate in candidates:
        if _is_sae_folder(candidate):
            return _inside(root, candidate)
    if _is_sae_folder(root) and not any(p.is_dir() for p in root.iterdir()):
        # A bare folder whose name does not say which layer it is for: accept it as-is.
        return _inside(root, root)
    found = sorted(
        str(path.parent.relative_to(root)) or "."
        for path in list(root.glob(CONFIG_FILENAME))
        + list(root.glob(f"*/{CONFIG_FILENAME}"))
        + list(root.glob(f"*/*/{CONFIG_FILENAME}"))
    )
    raise SaeFormatError(
        f"No SAE folder for layer {layer_name!r} (expected {FOLDER_PREFIX}{layer_name}/ with {CONFIG_FILENAME}) under {root}; "
        f"found: {', '.join(found) if found else 'no SAE folders'}."
    )
