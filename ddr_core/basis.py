"""A variant's basis: how its units (raw channels, or the features of an SAE) read and steer the layer.

Every stage that touches a unit goes through a :class:`Basis`:

- capture: :meth:`Basis.reduce` turns the layer's tokens ``(batch, positions, channels)`` into one value
  per unit ``(batch, width)`` (the spatial mean of the unit's per-position activation);
- dreams: :meth:`Basis.unit_activations` is the differentiable objective, each batch element's own unit
  ``(n, positions, channels) -> (n,)``, computing only what that unit needs; :meth:`Basis.unit_pre_activations`
  the same before the unit's ReLU (an SAE feature's encoder output: a gradient even where the feature is
  inactive; raw channels have no ReLU of their own, so it equals the activation);
- priors: :meth:`Basis.directions` is the steering direction of each unit in the layer's channel space
  ``(n,) -> (n, channels)``.

A new kind of SAE is one module (its format reader and its subclass) named in :data:`BASES` (its ``kind`` is the
config's ``basis``); :func:`load_basis` builds a variant's basis on a loaded model and checks its declared width.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ddr_core.lazy_imports import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


class Basis(ABC):
    """The units of a variant on one layer (see the module docstring). ``width``: number of units.

    A kind declares what the config needs to know about it: ``kind`` (the config's ``basis``),
    ``default_steer_scale`` (priors' strength scale when the run sets none), ``required_hook`` (the hook point it
    reads, e.g. ``"residual"``; ``None``: any), and :meth:`load` (its weights for a variant's layer).
    """

    kind: ClassVar[str]
    default_steer_scale: ClassVar[float] = 500.0
    required_hook: ClassVar[str | None] = None
    width: int | None

    @classmethod
    @abstractmethod
    def load(cls, sae_dir: Any, layer_name: str, layer_width: int, device: torch.device | str) -> Basis:
        """The basis for a layer ``layer_width`` wide: its SAE read from the provisioned folder ``sae_dir``
        (``None`` for kinds without weights), checked against the layer's width."""

    def check_units(self, units: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``units`` as a ``(n,)`` long tensor; raises naming them when one lies outside ``[0, width)``."""
        index = torch.as_tensor(units, dtype=torch.long).flatten()
        if self.width is None:
            raise ValueError(f"the basis does not know its width: build it with the layer's width to check {index.tolist()}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.width):
            raise ValueError(f"{self.unit_name} must lie in [0, {self.width}), got {sorted(set(index.tolist()))}")
        return index

    @property
    def unit_name(self) -> str:
        return "channels"

    @abstractmethod
    def reduce(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, positions, channels) -> (batch, width)``: each unit's mean over positions."""

    @abstractmethod
    def unit_activations(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """``(n, positions, channels)``, ``(n,)`` -> ``(n,)`` float32, differentiable: element ``i``'s
        activation of unit ``units[i]``, averaged over positions."""

    def unit_pre_activations(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Like :meth:`unit_activations` but before the unit's ReLU, averaged over positions (``(n,)`` float32,
        differentiable). Default: the activation itself (a unit without a ReLU of its own)."""
        return self.unit_activations(tokens, units)

    def unit_maps(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """``(n, positions, channels)``, ``(n,)`` -> ``(n, positions)`` float32: element ``i``'s activation of unit
        ``units[i]`` at every position (not averaged; what :meth:`unit_activations` averages)."""
        raise NotImplementedError(f"the {type(self).__name__} basis gives no per-position activations")

    @abstractmethod
    def directions(self, units: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``(n,) -> (n, channels)`` float32 on the CPU: each unit's steering direction in the layer."""


class RawChannels(Basis):
    """The layer's own channels: unit ``c`` is channel ``c``; its direction is the one-hot vector.

    ``width``: the layer's channel count (``None`` where only :meth:`reduce` / :meth:`unit_activations` are
    needed, e.g. an objective built before the layer is known)."""

    kind = "raw"

    default_steer_scale = 50.0

    @classmethod
    def load(cls, sae_dir: Any, layer_name: str, layer_width: int, device: torch.device | str) -> RawChannels:
        return cls(layer_width)

    def __init__(self, width: int | None) -> None:
        self.width = None if width is None else int(width)

    def reduce(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)

    def unit_activations(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        return self.unit_maps(tokens, units).mean(dim=1)

    def unit_maps(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        units = units.to(tokens.device, non_blocking=True)
        index = units[:, None, None].expand(-1, tokens.shape[1], 1)
        return tokens.gather(2, index).squeeze(2)

    def directions(self, units: Sequence[int] | torch.Tensor) -> torch.Tensor:
        index = self.check_units(units)
        directions = torch.zeros(index.numel(), self.width)
        directions[torch.arange(index.numel()), index] = 1.0
        return directions


class SaeFeatureBasis(Basis):
    """What every SAE kind shares: its features as units, each unit's activation the ReLU of its pre-activation
    averaged over positions, the pre-activation itself (a gradient where the feature is inactive). A kind gives
    :meth:`_pre` (per-position pre-activations), ``reduce``, ``directions`` and ``load``."""

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self.width = int(sae.num_latents)

    @property
    def unit_name(self) -> str:
        return "SAE features"

    def _pre(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """``(n, positions)``: each element's feature before the ReLU, per position."""
        raise NotImplementedError

    def unit_activations(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        return torch.relu(self._pre(tokens, units)).mean(dim=1).float()

    def unit_maps(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        return torch.relu(self._pre(tokens, units)).float()

    def unit_pre_activations(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        return self._pre(tokens, units).mean(dim=1).float()


class TopKSaeBasis(SaeFeatureBasis):
    """The features of a TopK SAE (SAeUron format, :class:`ddr_core.sae.Sae`).

    A feature's activation is its pre-top-k value ``relu(W_enc[f] . (x - b_dec) + b_enc[f])``: the objective
    of a dream keeps a gradient where the top-k would cut it. Its pre-activation (:meth:`unit_pre_activations`)
    drops the ReLU too: a gradient also where the feature is inactive (``pre < 0``). Its steering direction is
    its decoder row.
    """

    kind = "sae"

    @classmethod
    def load(cls, sae_dir: Any, layer_name: str, layer_width: int, device: torch.device | str) -> TopKSaeBasis:
        from ddr_core.sae import find_sae_folder, load_sae

        folder = find_sae_folder(sae_dir, layer_name)
        return cls(load_sae(folder, expected_d_in=layer_width, device=device, dtype=torch.float32))

    def reduce(self, tokens: torch.Tensor) -> torch.Tensor:
        parameter = next(self.sae.parameters())
        features = self.sae.feature_activations(tokens.to(device=parameter.device, dtype=parameter.dtype))
        return features.mean(dim=1)

    def _pre(self, tokens: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """``(n, positions)``: each element's feature before the ReLU, per position."""
        units = units.to(tokens.device)
        weight, bias = self.sae.encoder_rows(units)  # (n, d_in), (n,)
        inputs = self.sae.prepare_input(tokens) - self.sae.b_dec  # (n, N, d_in)
        return torch.einsum("bnd,bd->bn", inputs, weight) + bias[:, None]

    def directions(self, units: Sequence[int] | torch.Tensor) -> torch.Tensor:
        index = self.check_units(units).to(self.sae.W_dec.device)
        with torch.no_grad():
            return self.sae.decoder_directions(index).detach().float().cpu()


BASES: dict[str, str] = {
    "raw": "ddr_core.basis:RawChannels",
    "sae": "ddr_core.basis:TopKSaeBasis",
    "sdxl-unbox": "ddr_core.sae_unbox:UnboxSaeBasis",
}
"""Config ``basis`` -> ``module:class`` of its :class:`Basis` (imported on first use). A new SAE kind is one module
holding its format reader and its ``Basis`` subclass, plus its line here."""


REQUIRED_HOOKS: dict[str, str | None] = {"ddr_core.basis:RawChannels": None, "ddr_core.basis:TopKSaeBasis": None,
                                         "ddr_core.sae_unbox:UnboxSaeBasis": "residual"}
"""``module:class`` of a shipped :class:`Basis` -> its :attr:`Basis.required_hook`, read without importing its
module: config validation runs in every process that loads the Dagster definitions, and ``ddr_core.sae_unbox``
imports torch. A kind not listed here (a new one) is imported to read its class. ``tests/test_lazy_imports.py``
checks this table against the classes."""


def basis_required_hook(kind: str) -> str | None:
    """The hook point that a ``basis: kind`` must read, without importing the shipped kinds' modules.

    Raises ``ValueError`` listing the known kinds for an unknown ``kind``."""
    if kind not in BASES:
        raise ValueError(f"unknown basis {kind!r}; known: {', '.join(BASES)}")
    if BASES[kind] in REQUIRED_HOOKS:
        return REQUIRED_HOOKS[BASES[kind]]
    return basis_class(kind).required_hook


def basis_class(kind: str) -> type[Basis]:
    """The :class:`Basis` subclass of the config's ``basis: kind`` (``ValueError`` listing the known kinds)."""
    import importlib

    if kind not in BASES:
        raise ValueError(f"unknown basis {kind!r}; known: {', '.join(BASES)}")
    module_name, class_name = BASES[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def as_basis(value: Basis | Any | None, layer_width: int) -> Basis:
    """A :class:`Basis` from what a caller holds: a basis, an SAE, or ``None`` (raw channels of a layer
    ``layer_width`` wide)."""
    if isinstance(value, Basis):
        return value
    if value is None:
        return RawChannels(layer_width)
    return TopKSaeBasis(value)


def load_basis(project: Any, layout: Any, variant: str, model: Any, device: torch.device | str) -> Basis:
    """The basis of ``variant`` for the loaded ``model`` (a :class:`~ddr_core.families.ModelFamily` or pipeline): its
    kind's :meth:`Basis.load` (an SAE under ``layout.sae_dir`` checked against the layer's width, or the layer's raw
    channels), and its declared ``width`` checked.

    Raises:
        ValueError: the declared width differs from the model / SAE (the message gives the fix).
        ddr_core.sae.SaeFormatError: a missing or broken SAE, or ``d_in`` not matching the layer.
    """
    from ddr_core.families import as_model

    spec = project.variants[variant]
    layer_name = project.layer_of(variant)
    width = as_model(model).layer_width(layer_name)
    basis = basis_class(spec.basis).load(layout.sae_dir(spec.sae) if spec.sae else None, layer_name, width, device)
    if basis.width != spec.width:
        raise ValueError(f"variants.{variant}.width is {spec.width} in the config but the {spec.basis} basis "
                         f"has {basis.width}: set `width: {basis.width}`")
    return basis


class WeightsChangedError(ValueError):
    """A variant's model or SAE folder holds other weights than its capture (and so its statistics) was made with."""


def check_weights_match_capture(project: Any, layout: Any, variant: str) -> None:
    """Refuse to steer ``variant`` with other weights than its capture recorded.

    Priors, dreams and sweeps pick channels and timesteps from statistics of the ``activations`` capture;
    the capture's record names the content hash of the model and SAE it loaded (``upstream``). When the
    folder now provisioned has another content hash, the statistics describe weights that are gone.
    Nothing is compared when there is no capture record or a folder has no manifest.

    Raises:
        WeightsChangedError: naming the model / SAE, both hashes and the fix.
    """
    from ddr_core.provisioning import provisioned_content_hash
    from ddr_core.records import record_path

    spec = project.variants[variant]
    group = project.capture_of(variant)
    path = record_path(layout.records_dir, "activations", group)
    try:
        upstream = json.loads(path.read_text(encoding="utf-8")).get("upstream")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(upstream, dict):
        return
    folders = {("model", spec.model): layout.model_dir(spec.model)}
    if spec.sae:
        folders[("SAE", spec.sae)] = layout.sae_dir(spec.sae)
    for (kind, name), folder in folders.items():
        captured = upstream.get(f"{'models' if kind == 'model' else 'saes'}/{name}")
        now = provisioned_content_hash(folder)
        if isinstance(captured, str) and now is not None and captured != now:
            raise WeightsChangedError(
                f"{kind} {name!r} now holds other weights (content hash {now[:12]}) than activations[{group}] "
                f"was captured with ({captured[:12]}): the statistics and channels of variant {variant!r} "
                f"describe the old weights. Materialize activations[{group}] again and what depends on it "
                f"(timestep_stats, priors, dreams), or provision the weights it was captured with again"
            )
