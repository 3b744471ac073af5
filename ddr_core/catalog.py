"""Provision what the project configuration declares: models, SAEs and prompt datasets.

Turns a :class:`~ddr_core.config.SourceConfig` into a download (HF hub, Google Drive), a local copy or
a local build (the embedded tiny model, its SAE and prompts), always through
:func:`ddr_core.provisioning.provision`, so every provisioned folder carries the same manifest
(size and sha256 per file, one content hash) and the same skip / re-fetch behaviour.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ddr_core.atomic import atomic_write_json
from ddr_core.config import ProjectConfig, SourceConfig
from ddr_core.paths import DataLayout
from ddr_core.provisioning import (
    GoogleDriveSource,
    HubSource,
    LocalSource,
    ProvisionResult,
    check_intact,
    provision,
)

# Bump when a builtin builder's output changes: copies built by an older version are rebuilt.
BUILTIN_VERSION = 1
BUILTIN_MARKER = ".ddr_builtin.json"

EntryKind = Literal["model", "sae", "prompts"]
LogFn = Callable[[str], None]


def _build_builtin(builder: str, out_dir: Path) -> None:
    """Build an embedded asset into ``out_dir`` (deterministic, seeded; see :mod:`ddr_core.builtins`)."""
    from ddr_core.builtins import builtin_builder

    builtin_builder(builder)(out_dir)


def _read_marker(path: Path) -> object:
    """The builtin marker's content, or ``None`` when absent or not JSON (the copy is then rebuilt)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def provision_source(source: SourceConfig, dest: Path, log: LogFn | None = None,
                     verify: bool = True) -> ProvisionResult:
    """Provision one source into ``dest`` (skipped when an intact copy is there)."""
    dest = Path(dest)
    if source.builtin:
        marker = {"builtin": source.builtin, "version": BUILTIN_VERSION}
        marker_path = dest / BUILTIN_MARKER
        intact = check_intact(dest, verify=verify)
        if intact is not None and _read_marker(marker_path) == marker:
            if log:
                log(f"intact build of builtin {source.builtin!r} at {dest}: skipping")
            return intact
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".build-{dest.name}-", dir=dest.parent) as tmp:
            build_dir = Path(tmp) / "out"
            _build_builtin(source.builtin, build_dir)
            result = provision(LocalSource(build_dir), dest, progress=log, verify=verify)
        atomic_write_json(marker_path, marker)
        return result
    if source.hub:
        hub = source.hub
        return provision(HubSource(repo_id=hub.repo_id, revision=hub.revision,
                                   allow_patterns=hub.allow_patterns, repo_type=hub.repo_type),
                         dest, progress=log, verify=verify)
    if source.gdrive:
        gd = source.gdrive
        return provision(GoogleDriveSource(file_id=gd.file_id, folder_id=gd.folder_id, filename=gd.filename),
                         dest, progress=log, verify=verify)
    assert source.local is not None
    return provision(LocalSource(Path(source.local).expanduser()), dest, progress=log, verify=verify)


def entry_source(project: ProjectConfig, kind: EntryKind, name: str) -> SourceConfig:
    table = {"model": project.models, "sae": project.saes, "prompts": project.prompt_datasets}[kind]
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; declared: {sorted(table)}")
    return table[name].source


def entry_dir(layout: DataLayout, kind: EntryKind, name: str) -> Path:
    return {"model": layout.model_dir, "sae": layout.sae_dir, "prompts": layout.prompts_dir}[kind](name)


def provision_entry(project: ProjectConfig, layout: DataLayout, kind: EntryKind, name: str,
                    log: LogFn | None = None, verify: bool = True) -> ProvisionResult:
    """Provision the model / SAE / prompt dataset ``name`` declared in the project configuration."""
    return provision_source(entry_source(project, kind, name), entry_dir(layout, kind, name), log=log,
                            verify=verify)


def remove_entry(layout: DataLayout, kind: EntryKind, name: str) -> None:
    """Delete a provisioned copy (the next provisioning fetches it again)."""
    shutil.rmtree(entry_dir(layout, kind, name), ignore_errors=True)
