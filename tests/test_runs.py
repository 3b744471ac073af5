"""Runs (issue 17, items 6-8 and 11): named, tagged runs; the CLI refuses a throw-away instance and a wrong
partition key in one line; loading the definitions raises none of our own Dagster warnings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from dagster_project.definitions import defs
from ddr_assets import ALL_ASSETS

ROOT = Path(__file__).resolve().parents[1]
MATERIALIZE = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "dagster_project.definitions"]


def _env(tmp_path: Path, dagster_home: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "DDR_"))}
    env.update(OMP_NUM_THREADS="1", DDR_DATA_ROOT=str(tmp_path / "data"), PYTHONWARNINGS="ignore::DeprecationWarning")
    if dagster_home is not None:
        dagster_home.mkdir(exist_ok=True)
        shutil.copy(ROOT / "dagster_project" / "dagster.yaml", dagster_home / "dagster.yaml")
        env["DAGSTER_HOME"] = str(dagster_home)
    return env


def _cli(args: list[str], tmp_path: Path, dagster_home: Path | None) -> subprocess.CompletedProcess:
    return subprocess.run(MATERIALIZE + args, cwd=tmp_path, env=_env(tmp_path, dagster_home),
                          capture_output=True, text=True, timeout=600)


# --- item 7: no DAGSTER_HOME -------------------------------------------------------------------------


def test_cli_without_dagster_home_refuses_naming_the_project_instance(tmp_path):
    """Before: exit 0 on a temporary instance deleted at exit (the run never showed in the UI)."""
    out = _cli(["--select", "models", "--partition", "tiny"], tmp_path, dagster_home=None)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "DAGSTER_HOME is not set" in out.stderr
    assert f"export DAGSTER_HOME={ROOT / '.dagster_home'}" in out.stderr  # what `make dev` uses
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "data").exists(), "nothing may run on the throw-away instance"
    assert not list(tmp_path.glob(".tmp_dagster_home_*"))


def test_cli_run_on_the_project_instance_is_tagged(tmp_path, monkeypatch):
    """With DAGSTER_HOME the CLI run lands in that instance, tagged by ddr's executor (the path of every run
    launched from the UI, the daemon or the CLI)."""
    home = tmp_path / "home"
    out = _cli(["--select", "models", "--partition", "tiny"], tmp_path, dagster_home=home)
    assert out.returncode == 0, out.stdout + out.stderr
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        records = instance.get_run_records()
        assert len(records) == 1
        tags = records[0].dagster_run.tags
    assert tags["dagster/partition"] == "tiny"
    assert tags["ddr/stage"] == "models" and tags["ddr/model"] == "tiny"
    assert tags["ddr/experiment"] == "default"


# --- item 8: a wrong partition key -------------------------------------------------------------------


@pytest.mark.parametrize("option", [["--partition", "toy-raw:0-99"],
                                    ["--partition-range", "toy-raw:0-15...toy-raw:0-99"]])
def test_wrong_partition_key_is_one_short_error_listing_the_valid_keys(tmp_path, option):
    """Before: a 60-line DagsterInvalidSubsetError traceback naming only the wrong key."""
    out = _cli(["--select", "priors", *option], tmp_path, dagster_home=tmp_path / "home")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 4, out.stderr
    line = next(line for line in out.stderr.splitlines() if line.startswith("ddr: "))
    assert "'toy-raw:0-99' is not a partition of priors" in line
    assert "toy-raw:0-15, toy-raw:16-31, toy-raw:32-47, toy-raw:48-63" in line
    assert "python -m dagster_project.partitions priors --variant toy-raw" in line
    assert not (tmp_path / "data").exists()


def test_cli_checks_read_only_the_dagster_run_commands():
    from dagster_project.cli_checks import cli_problem, dagster_cli_command, nearest_keys

    assert dagster_cli_command(["/x/.venv/bin/dagster", "asset", "materialize", "-m", "m"]) == ("asset", "materialize")
    assert dagster_cli_command(["/x/site-packages/dagster/__main__.py", "job", "execute"]) == ("job", "execute")
    assert dagster_cli_command(["/x/bin/pytest", "asset", "materialize"]) is None
    home = {"DAGSTER_HOME": "/tmp/home"}
    assert cli_problem(["dagster", "dev"], {}, defs) is None  # the UI (and `dagster definitions validate`)
    assert cli_problem(["dagster", "api", "grpc"], {}, defs) is None  # code servers, step workers
    assert cli_problem(["dagster", "asset", "materialize", "--select", "models", "--partition", "tiny"], home,
                       defs) is None
    problem = cli_problem(["dagster", "asset", "materialize", "--select=timestep_stats", "--partition=toy-rwa"],
                          home, defs)
    assert problem and "'toy-rwa' is not a partition of timestep_stats" in problem and "toy-raw" in problem
    assert "DAGSTER_HOME" in cli_problem(["dagster", "job", "execute", "-j", "export_html"], {}, defs)
    problem = cli_problem(["dagster", "asset", "materialize", "--select", "prior", "--partition", "tiny"], home, defs)
    assert problem and "no asset named prior; did you mean priors?" in problem
    problem = cli_problem(["dagster", "asset", "materialize", "--select", "priors"], home, defs)
    assert problem and "priors is partitioned" in problem and "--partition tiny-raw:0-15" in problem
    assert cli_problem(["dagster", "asset", "materialize", "--select", "dream_sweeps"], home, defs) is None
    keys = [f"v:{i}-{i + 15}" for i in range(0, 320, 16)] + ["w:0-15"]
    near = nearest_keys("v:0-99", keys, limit=3)
    assert len(near) == 3 and all(k.startswith("v:") for k in near) and "v:0-15" in near
    assert nearest_keys("w:5-9", keys) == ["w:0-15"]


# --- item 11: our own Dagster warnings ---------------------------------------------------------------


def test_loading_the_definitions_raises_none_of_our_dagster_warnings(tmp_path):
    code = "import dagster_project.definitions"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT, env=_env(tmp_path, None),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for warning in ("BetaWarning", "PreviewWarning", "SupersessionWarning", "DeprecationWarning"):
        assert warning not in out.stderr, out.stderr


def test_the_warning_filter_is_narrow():
    """The filter holds only while the block assets are built: no process-wide filter is left behind."""
    import warnings

    import ddr_assets.blocks  # noqa: F401

    assert not [f for f in warnings.filters if f[1] is not None and "backfill_policy" in f[1].pattern]
    assert not [f for f in warnings.filters if f[0] == "ignore" and f[2] is dg.BetaWarning]


# --- item 6: named jobs and tags ---------------------------------------------------------------------


def test_every_asset_has_a_named_job_tagged_with_its_stage():
    from dagster_project.jobs import JOBS, job_of_asset

    for asset in ALL_ASSETS:
        name = asset.key.to_user_string()
        job = defs.resolve_job_def(job_of_asset(name))
        assert not job.name.startswith("__"), name
        assert name in job.tags["ddr/stage"].split(","), (name, job.tags)
    assert len({job.name for job in JOBS}) == len(JOBS)


def test_tags_of_each_kind_of_partition():
    from dagster_project.run_tags import ddr_run_tags

    assert ddr_run_tags(["priors"], "toy-raw:16-31", experiment="e1") == {
        "ddr/stage": "priors", "ddr/variant": "toy-raw", "ddr/block": "16-31", "ddr/experiment": "e1"}
    assert ddr_run_tags(["dreams"], partition_range=("toy-raw:0-15", "toy-raw:48-63"), experiment="e1")[
        "ddr/block"] == "0-15...48-63"
    assert ddr_run_tags(["activations"], "toy-world")["ddr/capture"] == "toy-world"
    assert ddr_run_tags(["timestep_stats"], "toy-sae")["ddr/variant"] == "toy-sae"
    assert ddr_run_tags(["saes"], "tiny-sae")["ddr/sae"] == "tiny-sae"
    assert ddr_run_tags(["models"], "tiny", run_config={"resources": {"storage": {"config": {"experiment": "x"}}}})[
        "ddr/experiment"] == "x"


def test_nightly_schedule_tags_its_runs():
    import datetime as dt

    from dagster_project.schedules import nightly_capture

    context = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 11, 27, 2, 0))
    request = next(iter(nightly_capture(context)))
    assert request.tags["ddr/capture"] == "toy-world" and request.tags["ddr/stage"] == "activations"
    assert request.tags["ddr/launched_by"] == "nightly_capture"


@pytest.mark.usefixtures("one_torch_thread")
def test_demo_runs_are_named_and_tagged_on_the_tiny_model(tmp_path, capfd):
    """The demo runner's runs (each stage through its named job) as the run list shows them; at the demo's
    default log level the console gets no per-event lines, the instance's event log keeps every event."""
    from dagster_project.demo import run_stage, stage_definitions
    from ddr_resources.resources import ComputeResource, DdrStorage

    storage = DdrStorage(data_root=str(tmp_path / "data"))
    stage_defs = stage_definitions(storage, ComputeResource(device="cpu"))
    instance = dg.DagsterInstance.ephemeral()
    for asset, key, config in [
        ("models", "tiny", None), ("saes", "tiny-sae", None), ("prompt_datasets", "tiny-prompts", None),
        ("activations", "tiny", {"n_prompts": 4, "batch_size": 4, "num_inference_steps": 4, "seed": 1}),
        ("timestep_stats", "tiny-raw", {"top_k": 5}),
        ("activity_plots", "tiny-raw:16-31", None),
    ]:
        run_config = {"ops": {asset: {"config": config}}} if config else None
        result = run_stage(stage_defs, asset, key, instance, run_config, storage.layout.experiment,
                           log_level="WARNING")
        assert result.success, asset
    printed = capfd.readouterr()
    assert "STEP_START" not in printed.out + printed.err
    plots_run = instance.get_run_records(dg.RunsFilter(tags={"ddr/block": "16-31"}))[0].dagster_run.run_id
    assert any(e.dagster_event and e.dagster_event.event_type_value == "STEP_START"
               for e in instance.all_logs(plots_run))
    result = run_stage(stage_defs, "activity_plots", "tiny-raw:32-47", instance, None, storage.layout.experiment)
    assert result.success and "STEP_START" in "".join(capfd.readouterr())  # the default (--verbose) prints them
    runs = {(r.dagster_run.job_name, r.dagster_run.tags.get("dagster/partition")): r.dagster_run.tags
            for r in instance.get_run_records()}
    assert set(runs) == {("provision_models", "tiny"), ("provision_saes", "tiny-sae"),
                         ("provision_prompt_datasets", "tiny-prompts"), ("capture_activations", "tiny"),
                         ("compute_timestep_stats", "tiny-raw"), ("visualise_channel_blocks", "tiny-raw:16-31"),
                         ("visualise_channel_blocks", "tiny-raw:32-47")}
    block = runs[("visualise_channel_blocks", "tiny-raw:16-31")]
    assert block["ddr/stage"] == "activity_plots" and block["ddr/variant"] == "tiny-raw"
    assert block["ddr/block"] == "16-31" and block["ddr/experiment"] == storage.layout.experiment
    assert block["ddr/launched_by"] == "demo"
    assert runs[("compute_timestep_stats", "tiny-raw")]["ddr/variant"] == "tiny-raw"
    assert runs[("capture_activations", "tiny")]["ddr/capture"] == "tiny"
    # the UI's run list filters by these tags
    filtered = instance.get_run_records(dg.RunsFilter(tags={"ddr/variant": "tiny-raw", "ddr/block": "16-31"}))
    assert [r.dagster_run.job_name for r in filtered] == ["visualise_channel_blocks"]


RUNS_QUERY = """query Runs($tags: [ExecutionTag!]) { runsOrError(filter: {tags: $tags}) {
  ... on Runs { results { jobName status tags { key value } } } ... on PythonError { message } } }"""
LAUNCH_ASSETS = """mutation Launch($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


def test_a_run_launched_from_the_ui_on_an_asset_gets_ddr_tags(tmp_path, monkeypatch):
    """The UI's asset page launches Dagster's implicit ``__ASSET_JOB`` with only ``dagster/partition``; ddr's
    executor tags the run, and the run list (GraphQL ``runsOrError``) filters by the ddr tags."""
    import time

    pytest.importorskip("httpx2", reason="starlette.testclient needs httpx2 (a huggingface_hub dependency)")
    from starlette.testclient import TestClient

    from dagster_project.launcher import build_ui_app, ui_process_context
    from ddr_core.web_guard import GuardConfig

    home = tmp_path / "home"
    home.mkdir()
    # the project's settings minus the run queue (no daemon here to dequeue): the run starts at once
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nrun_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\nrun_launcher:\n  module: dagster_project.worker_guard\n"
        "  class: DeadWorkerAwareRunLauncher\n")
    monkeypatch.setenv("DDR_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base, origin = "http://127.0.0.1:3000", {"Origin": "http://127.0.0.1:3000"}
    with dg.DagsterInstance.from_config(str(home)) as instance, \
            ui_process_context(instance, ROOT / "workspace.yaml", read_only=False) as context, \
            TestClient(build_ui_app(context, GuardConfig(bind_host="127.0.0.1", port=3000)), base_url=base) as client:
        location = client.post("/graphql", headers=origin, json={
            "query": "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"}
        ).json()["data"]["workspaceOrError"]["locationEntries"][0]["name"]
        params = {"selector": {"repositoryLocationName": location, "repositoryName": "__repository__",
                               "jobName": "__ASSET_JOB", "assetSelection": [{"path": ["models"]}]},
                  "mode": "default", "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "tiny"}]}}
        launched = client.post("/graphql", headers=origin, json={"query": LAUNCH_ASSETS, "variables": {"p": params}})
        assert launched.json()["data"]["launchRun"]["__typename"] == "LaunchRunSuccess", launched.text
        run_id = launched.json()["data"]["launchRun"]["run"]["runId"]
        deadline = time.monotonic() + 240
        while not instance.get_run_by_id(run_id).is_finished and time.monotonic() < deadline:
            assert instance.get_run_by_id(run_id).status != dg.DagsterRunStatus.QUEUED, "queued: no coordinator"
            time.sleep(1)
        assert instance.get_run_by_id(run_id).is_success, instance.get_run_by_id(run_id).status
        found = client.post("/graphql", headers=origin, json={"query": RUNS_QUERY, "variables": {
            "tags": [{"key": "ddr/stage", "value": "models"}, {"key": "ddr/model", "value": "tiny"}]}}).json()
    runs = found["data"]["runsOrError"]["results"]
    assert len(runs) == 1 and runs[0]["status"] == "SUCCESS"
    tags = {tag["key"]: tag["value"] for tag in runs[0]["tags"]}
    assert tags["ddr/experiment"] == "default" and tags["dagster/partition"] == "tiny"


@pytest.mark.usefixtures("one_torch_thread")
def test_demo_until_stops_after_the_named_stage(tmp_path, monkeypatch, capsys):
    """`demo --until timestep_stats` (docs/TOY_WORLD.md: purity needs no pictures) runs the plan up to that
    stage and no further: statistics written, no plots, priors or dreams."""
    from dagster_project import demo

    monkeypatch.setenv("DDR_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setitem(demo.DEMO_RUN_CONFIG, "activations",
                        {"seed": 0, "batch_size": 4, "n_prompts": 4, "num_inference_steps": 2})
    assert demo.main(["--variants", "tiny-raw", "tiny-sae", "--until", "timestep_stats"]) == 0
    out = capsys.readouterr().out
    assert "timestep_stats[tiny-raw]: ok" in out and "stopped after timestep_stats" in out
    assert "activity_plots[" not in out and "priors[" not in out
    with pytest.raises(SystemExit):
        demo.main(["--until", "no_such_stage"])


def test_the_demo_line_of_a_stage_names_its_failed_asset_checks():
    """A failing asset check does not fail its run: the demo's "ok" line must still say the check failed (the demo's
    feature_concepts_baseline and dream_quality checks failed on toy-sae while every line said "ok")."""
    from dagster_project.demo import failed_check_notes, stage_line

    @dg.asset(check_specs=[dg.AssetCheckSpec("quality", asset="scored"), dg.AssetCheckSpec("fine", asset="scored")])
    def scored():
        yield dg.Output(1)
        yield dg.AssetCheckResult(check_name="quality", passed=False, description="regressed: x 0.1 < 0.5 " + "y" * 300)
        yield dg.AssetCheckResult(check_name="fine", passed=True, description="all good")

    result = dg.materialize([scored], instance=dg.DagsterInstance.ephemeral())
    assert result.success  # the run is fine ...
    assert failed_check_notes(result, width=60) == [("check quality FAILED: regressed: x 0.1 < 0.5 " + "y" * 300)[:57]
                                                    + "..."]  # ... its check is not, and only the failed one is named
    assert stage_line("scored", "k", result, 1.25) == "  scored[k]: ok in 1.2s (check failed: quality)"

    @dg.asset
    def plain():
        return 1

    assert stage_line("plain", "k", dg.materialize([plain], instance=dg.DagsterInstance.ephemeral()), 2.0) \
        == "  plain[k]: ok in 2.0s"
