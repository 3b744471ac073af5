"""The resources' ``DDR_*`` variables, the Dagster way (ddr_resources/resources.py): the Definitions wire each
variable that is set as a ``dg.EnvVar`` (resolved when a run launches), a run config value wins over it, a
field the run config leaves out still follows its variable, and an empty variable means the default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from ddr_resources.resources import ComputeResource, DdrStorage

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = ("DDR_DATA_ROOT", "DDR_EXPERIMENT", "DDR_COMPUTE_MODE", "DDR_PROCESSES")

THROUGH_THE_DEFINITIONS = """
import json, os, sys
import dagster as dg
from dagster_project.definitions import defs
from ddr_resources.resources import ComputeResource, DdrStorage

wired = {key: {field: getattr(value, "env_var_name", getattr(value, "name", None)) if value is not None else None
               for field, value in resource.model_dump().items() if field != "device"}
         for key, resource in defs.resources.items() if key in ("storage", "compute")}
seen = []

@dg.asset
def probe(storage: DdrStorage, compute: ComputeResource):
    seen.append({"data_root": str(storage.layout.data_root), "experiment": storage.layout.experiment,
                 "mode": compute.compute_mode(), "processes": compute.process_count()})

job = dg.Definitions(assets=[probe], resources=defs.resources).resolve_implicit_global_asset_job_def()
os.environ["DDR_DATA_ROOT"] = sys.argv[1]  # changed after the code location loaded: read when the run launches
assert job.execute_in_process().success
assert job.execute_in_process(run_config=json.loads(sys.argv[2])).success
print(json.dumps({"wired": wired, "seen": seen}))
"""


def test_a_variable_reaches_the_resources_through_the_definitions_and_run_config_wins(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update({"DDR_DATA_ROOT": str(tmp_path / "loaded"), "DDR_EXPERIMENT": "from-env", "DDR_COMPUTE_MODE": "LOCAL",
                "DDR_PROCESSES": "3", "PYTHONPATH": str(ROOT)})
    launched, overridden = tmp_path / "launched", tmp_path / "run-config"
    run_config = {"resources": {"storage": {"config": {"data_root": str(overridden)}},
                                "compute": {"config": {"processes": 2}}}}
    done = subprocess.run([sys.executable, "-c", THROUGH_THE_DEFINITIONS, str(launched), json.dumps(run_config)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the Definitions hold dg.EnvVar for every variable that was set (none of them is required: only set ones)
    assert result["wired"] == {"storage": {"data_root": "DDR_DATA_ROOT", "experiment": "DDR_EXPERIMENT"},
                               "compute": {"mode": "DDR_COMPUTE_MODE", "processes": "DDR_PROCESSES"}}
    from_env, from_run_config = result["seen"]
    # resolved when the run launched (not when the code location loaded), normalised as before
    assert from_env == {"data_root": str(launched), "experiment": "from-env", "mode": "local", "processes": 3}
    # a run config value wins; the fields it leaves out still follow their variables (Dagster replaces the
    # whole configuration of a resource the run config names, so these come from the fallback at use)
    assert from_run_config == {"data_root": str(overridden), "experiment": "from-env", "mode": "local",
                               "processes": 2}


def test_an_empty_variable_means_the_default(monkeypatch):
    """``.env.example`` ships ``DDR_PROCESSES=`` ("an empty value means use the default"): before, an empty
    DDR_PROCESSES failed every GPU stage ("DDR_PROCESSES is ''")."""
    for name in VARIABLES:
        monkeypatch.setenv(name, "")
    compute = ComputeResource()
    assert (compute.compute_mode(), compute.process_count()) == ("local", 1)
    storage = DdrStorage()
    assert storage.layout.data_root == (ROOT / "data").resolve()
    assert storage.layout.experiment == storage.project.experiment
    monkeypatch.setenv("DDR_PROCESSES", " 2 ")
    assert ComputeResource().process_count() == 2


def test_an_empty_variable_is_not_wired_as_an_env_var(monkeypatch):
    """dg.EnvVar would hand the empty text to the field (and dg.EnvVar.int fail the run): not wired at all."""
    for name in VARIABLES:
        monkeypatch.setenv(name, "")
    assert DdrStorage.from_env().model_dump() == {"data_root": None, "experiment": None}
    compute = ComputeResource.from_env(device="cpu")
    assert (compute.device, compute.mode, compute.processes) == ("cpu", None, None)


def test_a_bad_value_names_where_it_came_from(monkeypatch):
    monkeypatch.setenv("DDR_COMPUTE_MODE", "gpu")
    with pytest.raises(dg.Failure, match=r"DDR_COMPUTE_MODE is 'gpu'; use one of"):
        ComputeResource().compute_mode()
    with pytest.raises(dg.Failure, match=r"ComputeResource.mode is 'gpu' \(from the run config or DDR_COMPUTE_MODE\)"):
        ComputeResource(mode="gpu").compute_mode()
    with pytest.raises(dg.Failure, match=r"ComputeResource.processes \(from the run config or DDR_PROCESSES\) is 0"):
        ComputeResource(processes=0).process_count()
    with pytest.raises(ValueError, match=r"DdrStorage.experiment \(from the run config or DDR_EXPERIMENT\)"):
        _ = DdrStorage(data_root="/tmp/x", experiment="../up").layout


def test_an_unresolved_env_var_never_becomes_a_folder(monkeypatch):
    """Outside a run a dg.EnvVar is only the variable's name (dg.EnvVar.int: 0): the resources refuse it
    instead of writing to ``./DDR_DATA_ROOT`` or reading a mode ``ddr_compute_mode``."""
    for name, value in {"DDR_DATA_ROOT": "/tmp/somewhere", "DDR_COMPUTE_MODE": "local", "DDR_PROCESSES": "2"}.items():
        monkeypatch.setenv(name, value)
    storage = DdrStorage.from_env()
    with pytest.raises(dg.DagsterInvariantViolationError, match=r"dg.EnvVar\('DDR_DATA_ROOT'\).*DdrStorage\(\)"):
        _ = storage.layout
    compute = ComputeResource.from_env()
    with pytest.raises(dg.DagsterInvariantViolationError, match=r"ComputeResource.mode is dg.EnvVar\('DDR_COMPUTE_MODE'"):
        compute.compute_mode()
    with pytest.raises(dg.DagsterInvariantViolationError, match=r"ComputeResource.processes is dg.EnvVar\('DDR_PROC"):
        compute.process_count()
    assert (ComputeResource().compute_mode(), ComputeResource().process_count()) == ("local", 2)
