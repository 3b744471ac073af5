"""Where everything lives under the data root.

::

    <data_root>/
      assets/                      provisioned inputs, shared by all experiments
        models/<model>/            diffusers folder (+ .ddr_manifest.json)
        saes/<sae>/                SAeUron folder(s) unet.<layer>/{cfg.json,sae.safetensors}
        prompts/<dataset>/         prompt file
      outputs/<experiment>/        everything an experiment computes
        activations/<capture>/     images, generations table, dense + top-k activations
        timestep_stats/<variant>/  statistics tables and stats.duckdb
        activity_plots/<variant>/  figures
        ...

Provisioned assets are shared across experiments (as in the thesis, whose ``assets_dir`` sat beside
``outputs_dir``); every computed output is namespaced by the experiment name.

Symbolic links: the data root may be reached through links (it is resolved once, in :class:`DataLayout`),
and its two top-level folders ``outputs/`` and ``assets/`` may themselves be links to another file system
(e.g. ``outputs -> /scratch/$USER/ddr-outputs``): their targets count as part of the data root
(:func:`data_root_folders`), stored paths still read ``outputs/...`` (:func:`relative_to_data_root`) and
readers accept them (:func:`resolve_in_data_root`). Below them, a stage, partition or channel folder must be a
real folder: :func:`check_output_folder` refuses a link there at the start of a stage, naming it, before
anything is written (an atomic folder swap would replace the link by a folder, and a link out of the data root
would make every stored path unreadable).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

NAME_MAX_LENGTH = 100
NAME_RULE = (f"1 to {NAME_MAX_LENGTH} lower-case letters, digits, '-', '_' or '.', starting with a letter or "
             f"digit, without '..' (e.g. 'tiny-raw', 'up_blocks.1.attentions.1')")
"""The one rule for every name that becomes a folder name or a partition key (models, SAEs, prompt datasets,
variants, capture groups, experiments, layers, stages, sweeps). It excludes path separators, ``.`` / ``..``
and ``...`` (Dagster's partition-range separator), ``:`` (the ``<variant>:<first>-<last>`` block-key
separator), upper case (folders that differ only in case collide on macOS / Windows), whitespace and control
characters (a ``$`` anchor would let a trailing newline through: the pattern is matched in full)."""

_NAME_RE = re.compile(rf"[a-z0-9][a-z0-9_.-]{{0,{NAME_MAX_LENGTH - 1}}}")


class UnsafePathError(ValueError):
    """A path would leave the directory it must stay in."""


class UnsafeNameError(UnsafePathError):
    """A name that becomes a folder name or a partition key breaks :data:`NAME_RULE`."""


def is_safe_name(name: object) -> bool:
    """Whether ``name`` follows :data:`NAME_RULE`."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and ".." not in name


def shown(value: object, limit: int = 60) -> str:
    """``value`` for a message: its ``repr`` (control characters and NUL bytes escaped), shortened when longer
    than ``limit`` characters (the start, the end and the length are kept)."""
    text = repr(value)
    if len(text) > limit:
        head = max(limit * 2 // 3, 10)
        text = f"{text[:head]}...{text[-10:]} ({len(value) if isinstance(value, str) else '?'} characters)"
    return text


_shown = shown


def check_name(name: object, field: str) -> str:
    """``name`` if it follows :data:`NAME_RULE`, else :class:`UnsafeNameError` naming ``field`` and the value.

    Args:
        name: the value to check.
        field: what it is, for the message (e.g. ``variants.tiny-raw.capture``, ``experiment``).
    """
    if not is_safe_name(name):
        raise UnsafeNameError(f"{field} {_shown(name)} is not a safe folder name (names become folder "
                              f"names and partition keys): use {NAME_RULE}")
    return name  # type: ignore[return-value]


def check_experiment_name(name: str) -> str:
    """An experiment name (a folder under ``outputs/``): :func:`check_name` with the field ``experiment``."""
    return check_name(name, "experiment")


def check_partition_key(key: object, field: str = "partition key") -> str:
    """A partition key (or a record's partition): safe names joined by ``:``, e.g. ``tiny-raw``,
    ``tiny-raw:0-15`` (a channel block, see ``ddr_assets.partitions``) or ``tiny-raw:<sweep name>``."""
    if not (isinstance(key, str) and all(is_safe_name(part) for part in key.split(":"))):
        raise UnsafeNameError(f"{field} {_shown(key)} is not a partition key: names joined by ':', each "
                              f"{NAME_RULE}")
    return key


def check_relative_file(value: object, field: str) -> str:
    """A config path of a file or folder inside a provisioned folder: relative, no ``..``, no backslash, no
    control characters, not empty nor ``.``. Links are checked where the path is used (:func:`resolve_inside`)."""
    if isinstance(value, str) and value.strip() and "\\" not in value and not any(
            ord(c) < 32 or ord(c) == 127 for c in value):
        path = PurePosixPath(value)
        if not path.is_absolute() and path.parts and not any(part in (".", "..") for part in path.parts):
            return value
    raise UnsafePathError(f"{field} {_shown(value)} must be a relative path inside the provisioned folder "
                          f"(no leading '/', no '..', no backslash, no control characters), e.g. 'prompts.jsonl'")


def resolve_inside(root: Path, relative: str | Path) -> Path:
    """``root / relative`` resolved, refusing anything that escapes ``root`` (``..``, absolute, links) and a
    path with a NUL byte (which no file system accepts: ``UnsafePathError`` instead of Python's ``ValueError``)."""
    if "\x00" in str(relative):
        raise UnsafePathError(f"path {shown(str(relative))} contains a NUL byte")
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise UnsafePathError(f"path {str(relative)!r} escapes {root}")
    return candidate


LINKABLE_FOLDERS: tuple[str, ...] = ("outputs", "assets")
"""The top-level folders of a data root that may be symbolic links to somewhere else (their targets then count
as part of the data root); nothing below them may be."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def data_root_folders(data_root: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``(prefix, real folder)`` of where data-root paths may lie: the targets of the top-level links
    :data:`LINKABLE_FOLDERS` that are links (prefix ``"outputs"`` / ``"assets"``), then the resolved data root
    itself (prefix ``""``)."""
    root = Path(data_root).resolve()
    found = []
    for name in LINKABLE_FOLDERS:
        real = (root / name).resolve()
        if real != root / name:
            found.append((name, real))
    found.append(("", root))
    return found


def relative_to_data_root(data_root: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """``path`` as the POSIX path relative to the data root that tables store; a path inside the target of a
    linked ``outputs/`` / ``assets/`` is written as ``outputs/...`` / ``assets/...``.

    Raises:
        UnsafePathError: ``path`` resolves outside the data root and those targets (it, or a folder above it,
            is a link leading elsewhere); the message names both and the fix.
    """
    real = Path(path).resolve()
    for prefix, folder in data_root_folders(data_root):
        if _inside(real, folder):
            relative = real.relative_to(folder).as_posix()
            return relative if not prefix else prefix if relative == "." else f"{prefix}/{relative}"
    raise UnsafePathError(
        f"{path} is not inside the data root {Path(data_root).resolve()} (it resolves to {real}): a link on the way "
        f"leads elsewhere. Only the data root itself and its top-level {' and '.join(LINKABLE_FOLDERS)} folders "
        "may be links; replace the link by a real folder, or link the whole data root (or its outputs/) instead")


def resolve_in_data_root(data_root: str | os.PathLike[str], relative: str | os.PathLike[str]) -> Path:
    """``data_root / relative`` resolved; like :func:`resolve_inside`, but the targets of a linked ``outputs/``
    or ``assets/`` (:func:`data_root_folders`) count as inside.

    Raises:
        UnsafePathError: the path escapes them (``..``, absolute, a link deeper down), or has a NUL byte.
    """
    if "\x00" in str(relative):
        raise UnsafePathError(f"path {shown(str(relative))} contains a NUL byte")
    root = Path(data_root).resolve()
    candidate = (root / relative).resolve()
    if any(_inside(candidate, folder) for _, folder in data_root_folders(root)):
        return candidate
    raise UnsafePathError(f"path {str(relative)!r} escapes {root}")


def check_output_folder(folder: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None,
                        what: str = "output folder") -> Path:
    """Refuse a stage's output ``folder`` reached through a symbolic link, before anything is written; returns
    ``folder``.

    With ``data_root``: ``folder`` must lie below it, and no folder on the way from the data root down to
    ``folder`` may be a link except the data root's top-level ``outputs/`` and ``assets/``. Without it, only
    ``folder`` itself is checked. In both cases no entry directly inside ``folder`` (a channel folder, a
    table) may be a link either.

    Why: a folder replaced as a whole (:func:`ddr_core.atomic.atomic_dir`) would replace the link by a real
    folder (the data silently moves off the link's target); a folder written in place through a link that
    leads out of the data root holds files whose stored paths no reader accepts (they escape the data root).

    Raises:
        UnsafePathError: naming the link, its target and the fix.
    """
    folder = Path(folder)
    fix = ("Replace the link by a real folder (e.g. `rm LINK && mv TARGET LINK`), or link the whole data root, "
           f"or its top-level {' or '.join(f'{n}/' for n in LINKABLE_FOLDERS)}, instead")
    links: list[Path] = []
    if data_root is not None:
        absolute = Path(os.path.abspath(folder))
        parts: tuple[str, ...] | None = None
        for base in (Path(os.path.abspath(data_root)), Path(data_root).resolve()):
            if _inside(absolute, base):
                parts = absolute.relative_to(base).parts
                break
        if parts is None:
            try:
                parts = Path(relative_to_data_root(data_root, folder)).parts
            except UnsafePathError:
                raise UnsafePathError(f"{what} {folder} is not below the data root {Path(data_root).resolve()}: "
                                      "stored paths are relative to the data root; write below it") from None
        current = Path(data_root).resolve()
        for depth, part in enumerate(parts):
            current = current / part
            if current.is_symlink() and not (depth == 0 and part in LINKABLE_FOLDERS):
                links.append(current)
                break
    elif folder.is_symlink():
        links.append(folder)
    if not links and folder.is_dir() and not folder.is_symlink():
        with os.scandir(folder) as entries:
            links += [Path(entry.path) for entry in entries if entry.is_symlink()]
    if links:
        link = links[0]
        raise UnsafePathError(f"{what} {folder} is reached through (or holds) the symbolic link {link} -> "
                              f"{os.readlink(link)}: ddr writes stage, partition and channel folders only as real "
                              f"folders. {fix}")
    return folder


def file_inside(folder: Path, relative: str, field: str) -> Path:
    """The file / folder ``relative`` (a config field) inside ``folder``, resolved; links included, it must
    stay inside (a link in a provisioned folder must not make another file's content pass for it).

    Raises:
        UnsafePathError: naming ``field``, the value and the folder.
    """
    check_relative_file(relative, field)
    try:
        return resolve_inside(folder, relative)
    except UnsafePathError:
        raise UnsafePathError(f"{field} {_shown(relative)} leads outside {Path(folder).resolve()} (through a "
                              f"link); re-provision the folder or name a file inside it") from None


@dataclass(frozen=True)
class DataLayout:
    """Paths of one experiment under one data root."""

    data_root: Path
    experiment: str = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_root", Path(self.data_root).resolve())
        check_experiment_name(self.experiment)

    # provisioned inputs ---------------------------------------------------------------------------
    @property
    def assets_dir(self) -> Path:
        return self.data_root / "assets"

    def model_dir(self, model: str) -> Path:
        return self.assets_dir / "models" / check_name(model, "model")

    def sae_dir(self, sae: str) -> Path:
        return self.assets_dir / "saes" / check_name(sae, "SAE")

    def prompts_dir(self, dataset: str) -> Path:
        return self.assets_dir / "prompts" / check_name(dataset, "prompt dataset")

    @property
    def provisioning_records_dir(self) -> Path:
        """Records of provisioned inputs (shared by experiments, like the inputs)."""
        return self.assets_dir / "_records"

    # experiment outputs ---------------------------------------------------------------------------
    @property
    def outputs_dir(self) -> Path:
        return self.data_root / "outputs" / self.experiment

    @property
    def records_dir(self) -> Path:
        """Records (completion reports) of this experiment's computed outputs."""
        return self.outputs_dir / "_records"

    def stage_dir(self, stage: str, key: str) -> Path:
        """``outputs/<experiment>/<stage>/<key>``; both must be safe names (:func:`check_name`), so a
        configuration built in code, not loaded, cannot point a stage outside the data root either."""
        return self.outputs_dir / check_name(stage, "stage") / check_name(key, f"{stage} partition")

    def activations_dir(self, capture: str) -> Path:
        return self.outputs_dir / "activations" / check_name(capture, "capture group")

    def timestep_stats_dir(self, variant: str) -> Path:
        return self.stage_dir("timestep_stats", variant)

    def activity_plots_dir(self, variant: str) -> Path:
        return self.stage_dir("activity_plots", variant)

    def relative(self, path: Path) -> str:
        """A path below the data root as a POSIX string relative to it (what tables store);
        :func:`relative_to_data_root` (a linked ``outputs/`` / ``assets/`` included)."""
        return relative_to_data_root(self.data_root, path)

    def check_output_folder(self, folder: Path, what: str = "output folder") -> Path:
        """:func:`check_output_folder` below this data root."""
        return check_output_folder(folder, self.data_root, what)
