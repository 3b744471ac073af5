"""SLURM job options and cluster-setting value types, with the strict forms every value must have.

Why strict: these values reach shells. dagster-slurm 1.22 writes ``partition``, ``account``, ``qos``,
``mem``, ``time_limit`` (and the remote run folder, from ``DDR_SLURM_REMOTE_BASE``) *unquoted* into the
``sbatch`` command line it runs over SSH on the login node, and the job script (``job.sh``) has the
pre-deployed env path and the run folder inside double quotes; ``requeue`` / ``mail_*`` become ``#SBATCH``
lines of that script (one per line). A run config value like ``partition: "gpu; <cmd> #"`` would run
``<cmd>`` on the login node as the service account, and a newline in ``mail_user`` would add a shell line
to the job. So every text value has a narrow pattern (names, times, sizes, an e-mail address, keyword
lists, safe paths: no whitespace, quotes, ``;``, ``$``, backticks, newlines, ...), checked with
``re.fullmatch`` where the value enters: run config (Dagster builds the run config class from
:class:`SlurmJobOptions`, so the step's config construction refuses a bad value before any job is
built), ``DDR_SLURM_*`` (``SlurmSettings.from_env``) and per-call options (:meth:`SlurmJobOptions.merged`).

This is the one definition of the job options: ``ddr_assets.configs.SlurmRunConfig`` (the ``slurm:``
run-config section) is generated from it. No Dagster import here.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PATH_CHARS = r"[A-Za-z0-9._+@,=/-]"
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
_MAIL_TYPE = "(?:" + "|".join(sorted(MAIL_TYPES, key=len, reverse=True)) + ")"

# name -> (regular expression, matched with re.fullmatch; the allowed form in words, with an example)
FORMS: dict[str, tuple[str, str]] = {
    "name": (_NAME, "a Slurm name: a letter or digit, then up to 63 letters, digits, '_', '.' or '-' "
                    "(e.g. plgmygrant-gpu-a100)"),
    "partition": (rf"{_NAME}(?:,{_NAME}){{0,15}}",
                  "a partition name or a comma-separated list of them, each a letter or digit then up to "
                  "63 letters, digits, '_', '.' or '-' (e.g. plgrid-gpu-a100)"),
    "time": (r"(?:[0-9]{1,4}-)?[0-9]{1,3}:[0-5][0-9]:[0-5][0-9]",
             "HH:MM:SS or D-HH:MM:SS (e.g. 02:00:00, 2-00:00:00)"),
    "mem": (r"[0-9]{1,9}[KMGT]?", "a whole number with an optional K, M, G or T suffix (e.g. 40G, 1500M)"),
    "mail_type": (rf"{_MAIL_TYPE}(?:,{_MAIL_TYPE}){{0,12}}",
                  f"a comma-separated list of {', '.join(MAIL_TYPES)} (e.g. END,FAIL)"),
    "email": (rf"[A-Za-z0-9_%+][A-Za-z0-9._%+-]{{0,63}}@{_LABEL}(?:\.{_LABEL}){{1,8}}",
              "an e-mail address: letters, digits, '.', '_', '%', '+', '-' before '@', a domain name after "
              "(e.g. a.b+c@uni.edu.pl)"),
    "host": (rf"{_LABEL}(?:\.{_LABEL}){{0,126}}|[0-9A-Fa-f]{{0,4}}(?::[0-9A-Fa-f]{{0,4}}){{2,7}}",
             "a host name (letters, digits, '-', dot-separated labels) or an IP address "
             "(e.g. athena.cyfronet.pl, 127.0.0.1)"),
    "user": (r"[A-Za-z_][A-Za-z0-9_.-]{0,31}",
             "a POSIX user name: a letter or '_', then up to 31 letters, digits, '_', '.' or '-' "
             "(e.g. plgsomeone)"),
    "local_path": (rf"(?:~/|/)?[A-Za-z0-9._+@,=]{_PATH_CHARS}{{0,4095}}",
                   "a path of letters, digits and . _ + @ , = / - only (no spaces, quotes, ';', '$', "
                   "backticks, newlines), optionally starting with ~/ (e.g. /home/someone/.ssh/id_ed25519)"),
    "remote_path": (rf"/{_PATH_CHARS}{{0,4095}}",
                    "an absolute path of letters, digits and . _ + @ , = / - only (no spaces, quotes, ';', "
                    "'$', backticks, newlines) (e.g. /net/pr2/projects/plgrid/plggddr/ddr/envs/ddr)"),
    "remote_base": (rf"(?:\$HOME)?/{_PATH_CHARS}{{0,4095}}",
                    "an absolute path, or one starting with $HOME/, of letters, digits and . _ + @ , = / - "
                    "only (no spaces, quotes, ';', other '$', backticks, newlines) (e.g. $HOME/pipelines)"),
}


def _checked(form: str):
    """An ``AfterValidator`` that accepts a string only when the whole of it matches ``FORMS[form]``."""
    regex, words = FORMS[form]
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"use {words}")
        return value

    return AfterValidator(check)


def allowed_form(form: str) -> str:
    """The allowed form of ``FORMS[form]`` in words (for error messages and docs)."""
    return FORMS[form][1]


SlurmName = Annotated[str, _checked("name")]
PartitionList = Annotated[str, _checked("partition")]
TimeLimit = Annotated[str, _checked("time")]
MemorySize = Annotated[str, _checked("mem")]
MailTypes = Annotated[str, _checked("mail_type")]
EmailAddress = Annotated[str, _checked("email")]
HostName = Annotated[str, _checked("host")]
UserName = Annotated[str, _checked("user")]
LocalPath = Annotated[str, _checked("local_path")]
RemotePath = Annotated[str, _checked("remote_path")]
RemoteBase = Annotated[str, _checked("remote_base")]


class SlurmJobOptions(BaseModel):
    """SLURM options of one job; a field left unset keeps the deployment default (``DDR_SLURM_*``).

    Used when the compute mode is ``slurm`` (ignored locally). ``signal_before_timeout`` and ``retries``
    make a stage survive preemption and time limits (docs/CLUSTER.md "Preemption and time limits"). ``mem`` is always passed to ``sbatch``
    when set (default ``DDR_SLURM_MEM``): dagster-slurm 1.22 drops its queue-level ``--mem`` when GPUs are
    requested unless the call sets ``mem``. ``requeue`` and ``mail_*`` become ``#SBATCH`` lines of the job
    script (dagster-slurm has no option for them). Every text field has a strict form (docs/CLUSTER.md):
    anything else is refused before a job is built.
    """

    model_config = ConfigDict(extra="forbid")

    partition: PartitionList | None = Field(None, description="partition, or a comma list, e.g. plgrid-gpu-a100")
    account: SlurmName | None = Field(None, description="grant / account, e.g. plgmygrant-gpu-a100")
    qos: SlurmName | None = Field(None, description="quality of service, e.g. normal")
    gpus_per_node: int | None = Field(None, ge=0, le=64, description="--gres=gpu:N (0..64)")
    cpus_per_task: int | None = Field(None, ge=1, le=1024, description="1..1024")
    mem: MemorySize | None = Field(None, description="memory per node, e.g. 40G")
    time_limit: TimeLimit | None = Field(None, description="HH:MM:SS or D-HH:MM:SS, e.g. 2-00:00:00")
    requeue: bool | None = Field(None, description="requeue on preemption / node failure (resumes where it was)")
    mail_type: MailTypes | None = Field(None, description="comma list of Slurm mail types, e.g. END,FAIL")
    mail_user: EmailAddress | None = Field(None, description="e-mail address, e.g. someone@uni.edu.pl")
    signal_before_timeout: int | None = Field(
        None, ge=0, le=86400, description="seconds before the time limit at which Slurm signals the job "
        "(--signal=B:USR1@N): the stage stops after the unit in progress and is resubmitted; 0: off")
    retries: int | None = Field(None, ge=0, le=100, description="how often a job that was preempted, requeued, "
                                "timed out or lost its node is resubmitted (it resumes from finished units)")

    @model_validator(mode="after")
    def _signal_inside_the_time_limit(self) -> SlurmJobOptions:
        if self.signal_before_timeout and self.time_limit:
            limit = time_limit_seconds(self.time_limit)
            if self.signal_before_timeout >= limit:
                raise ValueError(f"signal_before_timeout={self.signal_before_timeout}s is not shorter than "
                                 f"time_limit={self.time_limit} ({limit}s): the job would be told to stop at once; "
                                 f"use a lead of a few minutes, well inside the time limit")
        return self

    def merged(self, override: BaseModel | dict | None) -> SlurmJobOptions:
        """These options with the fields set in ``override`` replacing them (per-asset -> per-call).

        ``override`` is a ``SlurmJobOptions``, a dict or any pydantic model with these fields (the Dagster
        run config); the result is validated again, so a value that bypassed its model is refused here.
        """
        if override is None:
            return self
        given = override.model_dump() if isinstance(override, BaseModel) else dict(override)
        update = {name: value for name, value in given.items() if value is not None}
        return SlurmJobOptions.model_validate({**self.model_dump(exclude_none=True), **update})

    def extra_slurm_opts(self) -> dict[str, Any]:
        """The options dagster-slurm's ``extra_slurm_opts`` understands (it puts them unquoted into the
        ``sbatch`` command: every value is validated, and strings are shell-quoted on top, which leaves
        the allowed forms unchanged)."""
        keys = ("partition", "account", "qos", "gpus_per_node", "cpus_per_task", "mem", "time_limit")
        return {key: _quoted(getattr(self, key)) for key in keys if getattr(self, key) is not None}

    def sbatch_directives(self) -> list[str]:
        """The ``#SBATCH`` lines of the options dagster-slurm has no option for."""
        lines = []
        if self.requeue is not None:
            lines.append("#SBATCH --requeue" if self.requeue else "#SBATCH --no-requeue")
        if self.mail_type:
            lines.append(f"#SBATCH --mail-type={_quoted(self.mail_type)}")
        if self.mail_user:
            lines.append(f"#SBATCH --mail-user={_quoted(self.mail_user)}")
        if self.signal_before_timeout:  # B: the batch shell, which dagster-slurm's job script execs into python
            lines.append(f"#SBATCH --signal=B:USR1@{int(self.signal_before_timeout)}")
        return lines


def time_limit_seconds(value: str) -> int:
    """A :data:`TimeLimit` (``HH:MM:SS`` or ``D-HH:MM:SS``) in seconds."""
    days, _, clock = value.rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return (int(days) if days else 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def _quoted(value: Any) -> Any:
    if isinstance(value, str):
        if "\n" in value or "\r" in value:  # a directive is one line: no quoting makes a newline safe there
            raise ValueError(f"a SLURM option value contains a line break: {value!r}")
        return shlex.quote(value)
    return value
