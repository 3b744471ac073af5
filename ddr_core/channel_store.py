"""Where per-channel outputs live and how their records are read: one module for every stage.

Each per-channel stage writes one folder (or file) per channel, named :func:`channel_name`
(``channel_00042``), inside its stage folder ``outputs/<experiment>/<stage>/<variant>/``:

- priors: ``channel_<c>/`` with ``seed_<s>.png``, ``latents.safetensors`` and ``prior.json`` (written last:
  a channel is finished when it exists);
- dreams (and ``dreams_no_noise``): ``channel_<c>/`` with one ``t_<tttt>/`` folder per dreamed timestep
  (:func:`timestep_dir_name`) and ``dream.json`` (last);
- activity plots: ``channel_<c>.png`` or ``.gif``; representation shards: ``channel_<c>.json`` and
  ``curves/channel_<c>.parquet``.

Readers of another stage's outputs (representation, feature_concepts, the inspector, the HTML export) use
:func:`read_prior` / :func:`read_dream` instead of re-deriving the layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CHANNEL_PREFIX = "channel_"
PRIOR_FILE = "prior.json"
PRIOR_LATENTS_FILE = "latents.safetensors"
DREAM_FILE = "dream.json"
_CHANNEL_RE = re.compile(rf"^{CHANNEL_PREFIX}(\d+)(?:\..*)?$")


def channel_name(channel: int) -> str:
    """``channel_<c:05d>``: the name of a channel's folder, or the stem of its file."""
    return f"{CHANNEL_PREFIX}{int(channel):05d}"


def channel_of(name: str) -> int | None:
    """The channel a :func:`channel_name` (with or without a suffix) names, else ``None``."""
    match = _CHANNEL_RE.match(name)
    return int(match.group(1)) if match else None


def channel_dir(stage_dir: str | Path, channel: int) -> Path:
    """``stage_dir/channel_<c:05d>``."""
    return Path(stage_dir) / channel_name(channel)


def channel_file(folder: str | Path, channel: int, suffix: str) -> Path:
    """``folder/channel_<c:05d><suffix>`` (``suffix`` with its dot, e.g. ``.json``)."""
    return Path(folder) / f"{channel_name(channel)}{suffix}"


def timestep_dir_name(timestep: int) -> str:
    """``t_<tttt>``: a dream channel's folder for one timestep."""
    return f"t_{int(timestep):04d}"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def prior_record_path(priors_dir: str | Path, channel: int) -> Path:
    return channel_dir(priors_dir, channel) / PRIOR_FILE


def read_prior(priors_dir: str | Path, channel: int) -> dict[str, Any] | None:
    """The ``prior.json`` of a finished channel, or ``None`` when it is not finished."""
    return _read_json(prior_record_path(priors_dir, channel))


def dream_record_path(dreams_dir: str | Path, channel: int) -> Path:
    return channel_dir(dreams_dir, channel) / DREAM_FILE


def read_dream(dreams_dir: str | Path, channel: int) -> dict[str, Any] | None:
    """The ``dream.json`` of a finished channel, or ``None`` when it is not finished."""
    return _read_json(dream_record_path(dreams_dir, channel))


def finished_channels(stage_dir: str | Path, record_file: str) -> set[int]:
    """Channels of ``stage_dir`` whose folder holds ``record_file`` (``prior.json``, ``dream.json``)."""
    root = Path(stage_dir)
    if not root.is_dir():
        return set()
    found = (channel_of(path.parent.name) for path in root.glob(f"{CHANNEL_PREFIX}*/{record_file}"))
    return {c for c in found if c is not None}
