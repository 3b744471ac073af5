"""SLURM job options and cluster settings: every value that reaches a shell has a strict form.

dagster-slurm 1.22 puts ``partition``, ``account``, ``qos``, ``mem`` and ``time_limit`` unquoted into the
``sbatch`` command it runs over SSH, and ``requeue`` / ``mail_*`` become ``#SBATCH`` lines of the job
script; the cluster settings (``DDR_SLURM_*``) reach ``ssh`` arguments, the ``sbatch`` command and the job
script. Hostile values are refused where they enter (run config, environment, per-call options), good
ones give exactly the expected options, directives, ``sbatch`` command line and job script.
"""

import os
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

import ddr_resources.slurm as slurm_module
from ddr_assets.activations import ActivationsConfig
from ddr_assets.configs import SlurmRunConfig
from ddr_core.cluster_payload import StageRequest, run_stage
from ddr_resources.resources import ComputeResource, DdrStorage
from ddr_resources.slurm import SlurmJobOptions, SlurmSettings
from tests.tiny_graph import asset_def

CLUSTER_ENV = {"DDR_SLURM_HOST": "login.example.org", "DDR_SLURM_USER": "plgsomeone",
               "DDR_SLURM_KEY_PATH": "/home/someone/.ssh/id_ed25519", "DDR_SLURM_ENV_PATH": "/net/envs/ddr"}

# values that would inject a shell command, an sbatch option or a job-script line -- or are not a value
HOSTILE = ["gpu; touch /tmp/x #", "$(id)", "`id`", "gpu$(id)", "gpu\ntouch /tmp/x", "gpu\n", "\ngpu",
           "gpu\r\nid", "--wrap=id", "-pgpu", "gpu --wrap=id", "'gpu'", '"gpu"', "gpu a100", " gpu", "gpu ",
           "gpu\tx", "", "gpu|id", "gpu&&id", "gpu>x", "gpu<x", "gpu\\x", "gpu*", "gpu#", "gpu\0", "gpuå",
           "gpu${IFS}id"]

JOB_FIELDS = ["partition", "account", "qos", "mem", "time_limit", "mail_type", "mail_user"]
# per field: hostile values that look almost right for that field
HOSTILE_FOR = {
    "partition": ["plgrid-gpu-a100,", ",plgrid", "plgrid-gpu-a100;id", "plgrid gpu", "a" * 65],
    "account": ["plgmygrant-gpu-a100,other", "plgmygrant;id", "-plgmygrant", ".hidden"],
    "qos": ["normal,high", "normal;id", "_normal"],
    "mem": ["40GB", "40 G", "-1", "40G;id", "40g", "1.5G", "1234567890G", "G"],
    "time_limit": ["1:00", "2-00:00", "24:60:00", "00:00:60", "1 day", "02:00:00;id", "infinite", "2--00:00:00",
                   "12345-00:00:00"],
    "mail_type": ["end,fail", "END,,FAIL", "END,", "END;FAIL", "END FAIL", "END,FAIL\n#SBATCH --wrap=id",
                  "TIME_LIMIT_70", "BEGINEND"],
    "mail_user": ["someone", "@uni.edu.pl", "a@b", "a b@uni.edu.pl", "a@uni.edu.pl\n#SBATCH --wrap=id",
                  "a@uni.edu.pl;id", "-oa@uni.edu.pl", "a@-uni.edu.pl", "a@uni..pl", "$(id)@uni.edu.pl",
                  "a@uni.edu.pl "],
}
GOOD_FOR = {
    "partition": ["plgrid-gpu-a100", "plgrid", "debug", "gpu_v100.short", "plgrid-gpu-a100,plgrid-gpu-v100"],
    "account": ["plgmygrant-gpu-a100", "plgddr-gpu-a100", "plgddr"],
    "qos": ["normal", "high_prio", "normal-1"],
    "mem": ["40G", "1500M", "16384", "1T", "512K", "0"],
    "time_limit": ["02:00:00", "00:20:00", "2-00:00:00", "08:00:00", "48:00:00", "7-00:00:00", "1-12:30:15"],
    "mail_type": ["END,FAIL", "ALL", "NONE", "TIME_LIMIT_90", "BEGIN,END,FAIL,REQUEUE", "ARRAY_TASKS,TIME_LIMIT",
                  "INVALID_DEPEND,STAGE_OUT,TIME_LIMIT_80,TIME_LIMIT_50"],
    "mail_user": ["a.b+c@uni.edu.pl", "someone@example.org", "plg_someone@student.agh.edu.pl", "x@cyfronet.pl"],
}
ENV_OF = {"partition": "PARTITION", "account": "ACCOUNT", "qos": "QOS", "mem": "MEM", "time_limit": "TIME",
          "mail_type": "MAIL_TYPE", "mail_user": "MAIL_USER", "gpus_per_node": "GPUS_PER_NODE",
          "cpus_per_task": "CPUS"}


def _cases(table: dict[str, list[str]], fields: list[str], common: list[str] = ()) -> list[tuple[str, str]]:
    return [(field, value) for field in fields for value in [*common, *table.get(field, [])]]


# ---------------------------------------------------------------------------------------- job options


@pytest.mark.parametrize(("field", "value"), _cases(HOSTILE_FOR, JOB_FIELDS, HOSTILE))
def test_hostile_job_option_values_are_refused(field, value):
    """In the core model, in the Dagster run config class and in per-call options."""
    with pytest.raises(ValueError, match=field):
        SlurmJobOptions(**{field: value})
    with pytest.raises(ValueError, match=field):
        SlurmRunConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        SlurmJobOptions(mem="16G").merged({field: value})


@pytest.mark.parametrize(("field", "value"), _cases(GOOD_FOR, JOB_FIELDS))
def test_good_job_option_values_pass_unchanged(field, value):
    assert getattr(SlurmJobOptions(**{field: value}), field) == value
    assert getattr(SlurmRunConfig(**{field: value}), field) == value
    assert getattr(SlurmJobOptions().merged({field: value}), field) == value


@pytest.mark.parametrize(("field", "bad", "good"), [("gpus_per_node", [-1, 65, 1000], [0, 1, 8, 64]),
                                                   ("cpus_per_task", [0, -4, 1025], [1, 4, 128, 1024])])
def test_job_option_counts_are_bounded(field, bad, good):
    for value in bad:
        for model in (SlurmJobOptions, SlurmRunConfig):
            with pytest.raises(ValueError, match=field):
                model(**{field: value})
    for value in good:
        assert getattr(SlurmJobOptions(**{field: value}), field) == value
        assert getattr(SlurmRunConfig(**{field: value}), field) == value


def test_unknown_option_names_are_refused_also_per_call():
    with pytest.raises(ValueError, match="gpu_per_node"):
        SlurmJobOptions().merged({"gpu_per_node": 1})


def test_options_from_good_values_give_exactly_these_sbatch_options_and_directives():
    options = SlurmJobOptions(partition="plgrid-gpu-a100,plgrid-gpu-v100", account="plgmygrant-gpu-a100",
                              qos="normal", gpus_per_node=1, cpus_per_task=8, mem="40G", time_limit="2-00:00:00",
                              requeue=True, mail_type="END,FAIL", mail_user="a.b+c@uni.edu.pl")
    assert options.extra_slurm_opts() == {"partition": "plgrid-gpu-a100,plgrid-gpu-v100",
                                          "account": "plgmygrant-gpu-a100", "qos": "normal", "gpus_per_node": 1,
                                          "cpus_per_task": 8, "mem": "40G", "time_limit": "2-00:00:00"}
    assert options.sbatch_directives() == ["#SBATCH --requeue", "#SBATCH --mail-type=END,FAIL",
                                           "#SBATCH --mail-user=a.b+c@uni.edu.pl"]
    assert SlurmJobOptions(requeue=False).sbatch_directives() == ["#SBATCH --no-requeue"]
    assert SlurmJobOptions().sbatch_directives() == [] and SlurmJobOptions().extra_slurm_opts() == {}


def test_a_value_that_bypassed_validation_is_still_quoted_or_refused():
    """Defence in depth: ``model_construct`` skips validation; the command-building methods still quote
    (one shell word) and a line break never reaches a job-script line; ``merged`` validates again."""
    sneaked = SlurmJobOptions.model_construct(partition="gpu; touch /tmp/x #", mem="16G", mail_user="a@b.pl\nid")
    assert shlex.split(f"sbatch -p {sneaked.extra_slurm_opts()['partition']} job.sh") == [
        "sbatch", "-p", "gpu; touch /tmp/x #", "job.sh"]
    with pytest.raises(ValueError, match="line break"):
        sneaked.sbatch_directives()
    with pytest.raises(ValueError, match="partition"):
        sneaked.merged({"mem": "8G"})


# ------------------------------------------------------------------------------------ cluster settings

ENV_HOSTILE = {
    "HOST": ["-oProxyCommand=touch /tmp/x", "login;id", "login example.org", "$(id)", "login.example.org\nid",
             "user@login.example.org", "login.example.org:22", "-login", "login_node", "a" * 300],
    "USER": ["-oProxyCommand=touch /tmp/x", "root;id", "plg someone", "$(id)", "plgsomeone\nid", "1user",
             "a@b", "user:x"],
    "PORT": ["0", "65536", "22; id", "abc", "-1", "22 23"],
    "KEY_PATH": ["/home/a/.ssh/id; touch /tmp/x", "-oProxyCommand=x", "/home/a b/id", "/home/a/$(id)",
                 "/home/a/`id`", "/home/a/id\nx", "~root/.ssh/id", "/home/a/'id'", '/home/a/"id"', "$HOME/.ssh/id"],
    "KNOWN_HOSTS": ["/tmp/kh; id", "-oProxyCommand=x", "/tmp/k h", "/tmp/$(id)"],
    "HOST_KEY_CHECKING": ["no", "inherit", "STRICT", "strict; id", "yes"],
    "ENV_PATH": ["/net/envs/$(id)", "/net/envs/ddr; id", "relative/env", "~/env", "/net/envs/d dr",
                 "/net/envs/ddr\nid", "/net/envs/`id`", "/net/envs/ddr\"", "$HOME/env"],
    "REMOTE_BASE": ["$(id)/x", "$HOME/$(id)", "$HOME/a;id", "~/pipelines", "pipelines", "/p ipelines",
                    "$HOMER/x", "${HOME}/x", "/tmp/x\nid", "/tmp/%j"],
    "DATA_ROOT": ["/data; id", "/data/$(id)", "data", "/da ta", "/data\nid", "/data/`id`"],
    "CONFIG": ["/cfg.yaml; id", "cfg.yaml", "/c fg.yaml", "/cfg/$(id).yaml"],
    "POLL_TIMEOUT": ["0", "-5", "x", "1h"],
    "POLL_INTERVAL": ["0", "-1", "x", "inf", "nan"],
    "KEEP_RUN_DIRS": ["maybe", "yes; id"],
    "REQUEUE": ["maybe", "no; id"],
    "GPUS_PER_NODE": ["-1", "65", "1; id", "one"],
    "CPUS": ["0", "1025", "4; id"],
    # (from_env strips surrounding whitespace and takes an empty variable as unset)
    **{ENV_OF[field]: [v for v in [*HOSTILE_FOR[field], *HOSTILE] if v.strip() and v == v.strip()]
       for field in JOB_FIELDS},
}
# the allowed form each refusal names (a part of it)
ENV_FORM = {"HOST": "host name", "USER": "POSIX user name", "PORT": "1..65535", "KEY_PATH": "a path of letters",
            "KNOWN_HOSTS": "a path of letters", "HOST_KEY_CHECKING": "strict, accept-new or off",
            "ENV_PATH": "an absolute path", "REMOTE_BASE": "$HOME/", "DATA_ROOT": "an absolute path",
            "CONFIG": "an absolute path", "POLL_TIMEOUT": "whole seconds", "POLL_INTERVAL": "seconds > 0",
            "KEEP_RUN_DIRS": "yes or no", "REQUEUE": "yes or no", "GPUS_PER_NODE": "0..64", "CPUS": "1..1024",
            "PARTITION": "partition name", "ACCOUNT": "Slurm name", "QOS": "Slurm name", "MEM": "K, M, G or T",
            "TIME": "HH:MM:SS or D-HH:MM:SS", "MAIL_TYPE": "END,FAIL", "MAIL_USER": "e-mail address"}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, values in ENV_HOSTILE.items() for v in values])
def test_hostile_cluster_settings_are_refused_naming_the_variable_and_the_form(name, value):
    with pytest.raises(ValueError) as refused:
        SlurmSettings.from_env({**CLUSTER_ENV, f"DDR_SLURM_{name}": value})
    message = str(refused.value)
    assert f"DDR_SLURM_{name} is " in message and ENV_FORM[name] in message, message
    assert "\n" not in message  # the value is shown as its repr: one line


def test_good_cluster_settings_pass_and_give_exactly_these_settings():
    env = {"DDR_SLURM_HOST": "athena.cyfronet.pl", "DDR_SLURM_PORT": "2222", "DDR_SLURM_USER": "plgsomeone",
           "DDR_SLURM_KEY_PATH": "~/.ssh/id_ed25519_plgrid", "DDR_SLURM_HOST_KEY_CHECKING": "accept-new",
           "DDR_SLURM_KNOWN_HOSTS": "/home/someone/.ssh/known_hosts",
           "DDR_SLURM_ENV_PATH": "/net/pr2/projects/plgrid/plggddr/ddr/envs/ddr",
           "DDR_SLURM_REMOTE_BASE": "$HOME/pipelines", "DDR_SLURM_DATA_ROOT": "/net/pr2/projects/plgrid/plggddr/ddr/data",
           "DDR_SLURM_CONFIG": "/net/pr2/projects/plgrid/plggddr/ddr/src/config/project.yaml",
           "DDR_SLURM_POLL_TIMEOUT": "3600", "DDR_SLURM_POLL_INTERVAL": "1.5", "DDR_SLURM_KEEP_RUN_DIRS": "yes",
           "DDR_SLURM_PARTITION": "plgrid-gpu-a100", "DDR_SLURM_ACCOUNT": "plgmygrant-gpu-a100",
           "DDR_SLURM_QOS": "normal", "DDR_SLURM_GPUS_PER_NODE": "1", "DDR_SLURM_CPUS": "8", "DDR_SLURM_MEM": "64G",
           "DDR_SLURM_TIME": "08:00:00", "DDR_SLURM_REQUEUE": "no", "DDR_SLURM_MAIL_TYPE": "END,FAIL",
           "DDR_SLURM_MAIL_USER": "a.b+c@uni.edu.pl"}
    settings = SlurmSettings.from_env(env)
    assert settings.model_dump(exclude={"job"}) == {
        "host": "athena.cyfronet.pl", "port": 2222, "user": "plgsomeone", "key_path": "~/.ssh/id_ed25519_plgrid",
        "host_key_checking": "accept-new", "known_hosts_file": "/home/someone/.ssh/known_hosts",
        "env_path": "/net/pr2/projects/plgrid/plggddr/ddr/envs/ddr", "remote_base": "$HOME/pipelines",
        "data_root": "/net/pr2/projects/plgrid/plggddr/ddr/data",
        "config_path": "/net/pr2/projects/plgrid/plggddr/ddr/src/config/project.yaml", "poll_timeout": 3600,
        "poll_interval": 1.5, "keep_run_dirs": True}
    assert settings.job.extra_slurm_opts() == {"partition": "plgrid-gpu-a100", "account": "plgmygrant-gpu-a100",
                                               "qos": "normal", "gpus_per_node": 1, "cpus_per_task": 8,
                                               "mem": "64G", "time_limit": "08:00:00"}
    assert settings.job.sbatch_directives() == ["#SBATCH --no-requeue", "#SBATCH --mail-type=END,FAIL",
                                                "#SBATCH --mail-user=a.b+c@uni.edu.pl"]
    # the local test cluster's values (scripts/slurm/start_local_cluster.sh) and the documented defaults
    local = SlurmSettings.from_env({"DDR_SLURM_HOST": "127.0.0.1", "DDR_SLURM_PORT": "2222", "DDR_SLURM_USER": "root",
                                    "DDR_SLURM_KEY_PATH": "/tmp/ddr-slurm/ssh/id_ed25519",
                                    "DDR_SLURM_HOST_KEY_CHECKING": "off", "DDR_SLURM_ENV_PATH": "/tmp/ddr-slurm/env-ddr",
                                    "DDR_SLURM_PARTITION": "debug", "DDR_SLURM_CPUS": "1", "DDR_SLURM_MEM": "2G",
                                    "DDR_SLURM_TIME": "00:20:00", "DDR_SLURM_POLL_INTERVAL": "1"})
    assert local.job.extra_slurm_opts() == {"partition": "debug", "gpus_per_node": 0, "cpus_per_task": 1,
                                            "mem": "2G", "time_limit": "00:20:00"}
    defaults = SlurmSettings.from_env(CLUSTER_ENV)
    assert defaults.job.extra_slurm_opts() == {"gpus_per_node": 0, "cpus_per_task": 4, "mem": "16G",
                                               "time_limit": "02:00:00"}
    assert (defaults.port, defaults.host_key_checking, defaults.remote_base) == (22, "strict", None)
    assert SlurmSettings.from_env({**CLUSTER_ENV, "DDR_SLURM_HOST": "::1"}).host == "::1"


# ----------------------------------------------------------------- through Dagster: run config -> job


class _RecordingCluster:
    """dagster-slurm's ``ComputeResource`` at the point of submission: builds what it would send over SSH
    -- the real ``sbatch`` command line (``SlurmPipesClient._build_sbatch_command``) and the real job script
    (the launcher's ``prepare_execution``) -- records both, then runs the stage in-process as "the job"
    (so its completion report exists)."""

    RUN_DIR = "/remote/pipelines/runs/r1/step"

    def __init__(self, settings: SlurmSettings):
        self.compute = slurm_module.build_slurm_compute(settings)  # the real dagster-slurm resource
        self.submissions: list[dict] = []

    def run(self, *, context, payload_path, launcher, extra_slurm_opts, extras, **kwargs):
        client = self.compute.get_pipes_client(context, launcher=launcher)
        sbatch = client._build_sbatch_command(
            job_name="dagster_step", working_dir=self.RUN_DIR, output_file=f"{self.RUN_DIR}/slurm-%j.out",
            error_file=f"{self.RUN_DIR}/slurm-%j.err", script_path=f"{self.RUN_DIR}/job.sh",
            extra_opts=extra_slurm_opts)
        plan = launcher.prepare_execution(payload_path=f"{self.RUN_DIR}/payload.py",
                                          python_executable="/net/envs/ddr/env/bin/python",
                                          working_dir=self.RUN_DIR, pipes_context={},
                                          activation_script="/net/envs/ddr/activate.sh")
        self.submissions.append({"sbatch": sbatch, "job_script": plan.payload})
        run_stage(StageRequest.model_validate(extras["request"]), log=lambda message: None)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    key = tmp_path / "id_ed25519"
    key.write_text("not a real key\n")
    for name, value in {**CLUSTER_ENV, "DDR_SLURM_KEY_PATH": str(key)}.items():
        monkeypatch.setenv(name, value)
    for name in ("DDR_SLURM_DATA_ROOT", "DDR_SLURM_CONFIG", "DDR_SLURM_PARTITION", "DDR_SLURM_ACCOUNT",
                 "DDR_SLURM_QOS", "DDR_SLURM_MEM", "DDR_SLURM_TIME", "DDR_SLURM_CPUS", "DDR_SLURM_GPUS_PER_NODE",
                 "DDR_SLURM_REQUEUE", "DDR_SLURM_MAIL_TYPE", "DDR_SLURM_MAIL_USER", "DDR_SLURM_REMOTE_BASE"):
        monkeypatch.delenv(name, raising=False)
    recording = _RecordingCluster(SlurmSettings.from_env())
    monkeypatch.setattr(slurm_module, "build_slurm_compute", lambda settings=None, **kwargs: recording)
    return recording


@dg.asset
def gpu_step(context: dg.AssetExecutionContext, config: ActivationsConfig, storage: DdrStorage,
             compute: ComputeResource):
    """Calls the compute resource exactly as the GPU assets do, with the activations' real run config."""
    compute.run_stage(context, "selftest", {"echo": "hi"}, storage=storage, options=config.slurm)


def _run(asset, tmp_path, slurm: dict, partition_key: str | None = None) -> dg.ExecuteInProcessResult:
    return dg.materialize([asset], partition_key=partition_key, raise_on_error=False,
                          run_config={"ops": {asset.key.path[-1]: {"config": {"slurm": slurm}}}},
                          resources={"storage": DdrStorage(data_root=str(tmp_path / "data")),
                                     "compute": ComputeResource(device="cpu", mode="slurm")})


def _step_error(result: dg.ExecuteInProcessResult) -> str:
    return str(next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error)


def test_good_run_config_reaches_sbatch_and_the_job_script_exactly(cluster, tmp_path):
    slurm = {"partition": "plgrid-gpu-a100", "account": "plgmygrant-gpu-a100", "qos": "normal", "mem": "40G",
             "time_limit": "2-00:00:00", "gpus_per_node": 2, "cpus_per_task": 8, "requeue": True,
             "mail_type": "END,FAIL", "mail_user": "a.b+c@uni.edu.pl"}
    result = _run(gpu_step, tmp_path, slurm)
    assert result.success
    (submission,) = cluster.submissions
    run_dir = _RecordingCluster.RUN_DIR
    assert submission["sbatch"] == (
        f"sbatch -J dagster_step -D {run_dir} -o {run_dir}/slurm-%j.out -e {run_dir}/slurm-%j.err "
        f"-p plgrid-gpu-a100 -t 2-00:00:00 -c 8 --mem=40G -N 1 --gres=gpu:2 --qos=normal "
        f"--account=plgmygrant-gpu-a100 {run_dir}/job.sh")
    script = submission["job_script"]
    assert script[:4] == ["#!/bin/bash", "#SBATCH --requeue", "#SBATCH --mail-type=END,FAIL",
                          "#SBATCH --mail-user=a.b+c@uni.edu.pl"]
    assert [line for line in script if line.startswith("#SBATCH")] == script[1:4]


@pytest.mark.parametrize(("field", "value"), [
    ("partition", "gpu; touch /tmp/x #"), ("partition", "gpu\ntouch /tmp/x"), ("account", "$(id)"),
    ("qos", "`id`"), ("mem", "16G --wrap=id"), ("time_limit", "02:00:00;id"), ("mail_type", "END\nid"),
    ("mail_user", "a@uni.edu.pl\n#SBATCH --wrap=id"), ("mail_user", "'a@b.pl'"), ("partition", ""),
    ("gpus_per_node", 65), ("cpus_per_task", 0),
])
def test_a_hostile_run_config_value_fails_the_step_before_any_job_is_built(cluster, tmp_path, field, value):
    result = _run(gpu_step, tmp_path, {field: value})
    assert not result.success
    assert f"slurm.{field}" in _step_error(result)
    assert cluster.submissions == []  # no sbatch command, no job script
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "id_ed25519"]


@pytest.mark.parametrize("name", ["activations", "priors", "dreams", "dreams_no_noise"])
def test_every_gpu_asset_refuses_a_hostile_slurm_section(cluster, tmp_path, name):
    asset = asset_def(name)
    result = _run(asset, tmp_path, {"partition": "gpu; touch /tmp/x #", "mail_user": "a@b.pl\nid"},
                  partition_key=asset.partitions_def.get_partition_keys()[0])
    assert not result.success
    error = _step_error(result)
    assert "slurm.partition" in error and "slurm.mail_user" in error
    assert cluster.submissions == []


def test_a_hostile_cluster_setting_fails_the_step_naming_the_variable_before_any_job_is_built(cluster, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setenv("DDR_SLURM_PARTITION", "gpu; touch /tmp/x #")
    result = _run(gpu_step, tmp_path, {"mem": "8G"})
    assert not result.success
    error = _step_error(result)
    assert "DDR_SLURM_PARTITION is 'gpu; touch /tmp/x #'" in error and "partition name" in error
    assert cluster.submissions == []


def test_the_job_script_launcher_and_the_log_reader_refuse_what_is_not_theirs():
    """Our own command / script building: an ``#SBATCH`` entry must be one ``#SBATCH --`` line, and the
    job log reader puts only a numeric job id into its (quoted) ``tail`` command."""
    launcher = slurm_module._directives_launcher_class()(
        sbatch_directives=["#SBATCH --mail-user=a@uni.edu.pl", "touch /tmp/x"])
    with pytest.raises(ValueError, match="#SBATCH"):
        launcher.prepare_execution(payload_path="/r/payload.py", python_executable="/e/env/bin/python",
                                   working_dir="/r", pipes_context={})
    launcher = slurm_module._directives_launcher_class()(sbatch_directives=["#SBATCH --requeue\ntouch /tmp/x"])
    with pytest.raises(ValueError, match="#SBATCH"):
        launcher.prepare_execution(payload_path="/r/payload.py", python_executable="/e/env/bin/python",
                                   working_dir="/r", pipes_context={})
    files = object.__new__(slurm_module._JobFiles)  # no SSH connection: it must not get that far
    for job_id in ("1; touch /tmp/x", "$(id)", "12\n13", "-1"):
        assert files.log_tail(job_id) == ""


class _LocalShell:
    """An ``SSHConnectionPool`` stand-in that runs each command in a local bash whose ``$HOME`` is ``home``:
    the cluster's file system, for the job-folder commands."""

    def __init__(self, home: Path):
        self.home, self.commands = home, []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def run(self, command: str) -> str:
        self.commands.append(command)
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30,
                              env={"HOME": str(self.home), "PATH": os.environ["PATH"]})
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.mark.parametrize("remote_base", [None, "$HOME/jobs", "ABSOLUTE"])
def test_the_job_folder_is_found_by_its_job_id_without_private_dagster_slurm_api(tmp_path, remote_base):
    """dagster-slurm puts a job's script and ``slurm-<id>.out/.err`` in ``<remote_base>/runs/<run id>/<step>``
    (``remote_base`` default ``$HOME/pipelines``): the log tail and the removal find that folder by the job id,
    and touch nothing else; without a job id the removal is dagster-slurm's public deferred clean-up."""
    home = tmp_path / "home"
    if remote_base == "ABSOLUTE":
        remote_base = str(tmp_path / "shared" / "ddr-jobs")
    base = Path(str(remote_base or "$HOME/pipelines").replace("$HOME", str(home)))
    run_id = "3f2b6c1e-8a4d-4c2b-9e1f-0123456789ab"
    job_dir = base / "runs" / run_id / "priors__partition=tiny-raw_0-15"
    other = base / "runs" / run_id / "dreams"
    older_run = base / "runs" / "0f2b6c1e-8a4d-4c2b-9e1f-0123456789ab" / "priors"
    for folder, job in ((job_dir, "123"), (other, "124"), (older_run, "123")):
        folder.mkdir(parents=True)
        (folder / f"slurm-{job}.out").write_text(f"JOB {job} ON node1\nline two\n")
        (folder / f"slurm-{job}.err").write_text("oom-kill event\n")
        (folder / "job.sh").write_text("#!/bin/bash\n")
    shell = _LocalShell(home)
    cleaned = []
    compute = SimpleNamespace(slurm=SimpleNamespace(ssh="ssh-config"),
                              cleanup_deferred_run_dir=lambda context: cleaned.append(context))
    context = SimpleNamespace(run=SimpleNamespace(run_id=run_id), log=SimpleNamespace(warning=print))
    files = slurm_module._JobFiles(compute, context, remote_base, pool_factory=lambda ssh: shell)

    tail = files.log_tail("123")
    assert "--- slurm-123.out (last 40 lines) ---\nJOB 123 ON node1\nline two" in tail
    assert "--- slurm-123.err (last 40 lines) ---\noom-kill event" in tail
    assert files.log_tail("999") == ""  # no such job in this run: nothing, and no error
    files.remove("123")
    assert not job_dir.exists() and other.is_dir() and older_run.is_dir()  # only this job's folder
    assert cleaned == []
    files.remove(None)  # never submitted: dagster-slurm's own (public) deferred clean-up
    assert cleaned == [context]
    assert not any("$(" in c or "`" in c for c in shell.commands)
