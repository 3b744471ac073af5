"""Against a real SLURM cluster (scripts/slurm/start_local_cluster.sh); skipped unless DDR_SLURM_HOST is set.

Needs DDR_SLURM_HOST/PORT/USER/KEY_PATH/ENV_PATH (see docs/CLUSTER.md) and a data root the cluster
shares (the loopback cluster shares everything).
"""

import os
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.skipif(not os.environ.get("DDR_SLURM_HOST"),
                                reason="no SLURM cluster (run scripts/slurm/start_local_cluster.sh, set DDR_SLURM_*)")


def run_asset(where: str, stage: str, args: dict, root: Path, device: str = "cpu"):
    from dagster_project.slurm import new_request, run_stage_locally, run_stage_on_slurm

    reports = []

    @dg.asset(name=f"{stage}_{where}")
    def _asset(context: dg.AssetExecutionContext):
        request = new_request(stage, args, data_root=root, experiment="default", device=device,
                              lock_owner=f"dagster run {context.run.run_id}")
        report = (run_stage_on_slurm(context, request, local_data_root=root) if where == "slurm"
                  else run_stage_locally(context, request))
        reports.append(report)
        return dg.MaterializeResult(metadata={"invocation": request.invocation_id})

    result = dg.materialize([_asset], raise_on_error=False)
    return result, reports


def failure_of(result: dg.ExecuteInProcessResult):
    event = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return event.event_specific_data


def test_selftest_job_succeeds_with_its_report(tmp_path):
    result, reports = run_asset("slurm", "selftest", {"echo": "hi"}, tmp_path)
    assert result.success
    assert reports[0]["slurm_job_id"] and reports[0]["result"]["echo"] == "hi"


def test_crashing_payload_fails_the_run_with_job_id_and_traceback(tmp_path):
    result, reports = run_asset("slurm", "selftest", {"fail": True, "message": "boom from payload"}, tmp_path)
    assert not result.success and not reports
    data = failure_of(result)
    metadata = {k: v.value for k, v in data.user_failure_data.metadata.items()}
    assert "boom from payload" in data.error.message
    assert metadata["slurm_job_id"].isdigit()
    assert "RuntimeError: boom from payload" in metadata["traceback_tail"]
    written = [p.name for p in (tmp_path / "outputs/default/_jobs").glob("*.json")]
    assert written and all(name.endswith(".error.json") for name in written)  # no completion report


def test_capture_on_slurm_equals_local(tmp_path):
    from tests.tiny_graph import materialize, step_error

    instance = dg.DagsterInstance.ephemeral()
    config = {"n_prompts": 6, "batch_size": 4, "num_inference_steps": 8, "seed": 1}
    for where in ("slurm", "local"):
        root = tmp_path / where
        for name, key in [("models", "tiny"), ("saes", "tiny-sae"), ("prompt_datasets", "tiny-prompts")]:
            provisioned = materialize(name, key, root, instance)
            assert provisioned.success, step_error(provisioned)
        result, _ = run_asset(where, "capture_group", {"group": "tiny", "config": config}, root)
        assert result.success
    slurm_dir, local_dir = (tmp_path / w / "outputs/default/activations/tiny" for w in ("slurm", "local"))
    files = sorted(p.relative_to(slurm_dir) for p in slurm_dir.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(local_dir) for p in local_dir.rglob("*.safetensors"))
    for name in files:
        a, b = load_file(slurm_dir / name), load_file(local_dir / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
