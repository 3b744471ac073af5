"""Every command in README.md and docs/*.md works when pasted, in order, on a fresh clone.

The fenced ``bash`` / ``sh`` / ``shell`` blocks of README.md, then of docs/*.md (alphabetically), run in order in
one shell (``set -euo pipefail``: exports carry over, the first failing command fails the test) in a fresh
"clone": a temporary folder holding links to the repository's tracked files and its ``.venv``, so ``./data``
and ``$PWD/.dagster_home`` are new and empty.

A block that must not run here (it installs things, runs for minutes, starts a server, needs a GPU, a SLURM
site or the network) carries, on the line right before its fence::

    <!-- not-run: <reason>; covered by <tests/test_x.py[::test_name]> -->

and the test that covers it must exist (checked below).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.timing import children_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[\w-]*)\s*$")
SHELL_INFOS = {"bash", "sh", "shell"}
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>.+?);\s*covered by\s+(?P<cover>\S+)\s*-->\s*$")
MAKE_WITHOUT_INSTALL = {"dagster-home"}  # make targets that install nothing (they may run here)
# The whole walk: ~10 `dagster asset materialize` calls on the tiny model (seconds of work each; the CLI's start
# dominates). Measured 16:28-16:3x UTC on a 2-core machine at load ~3.5: see the notes; a failure past this
# limit means a long block slipped in: tag it not-run.
BUDGET_S = 600


@dataclass(frozen=True)
class Block:
    """One fenced shell block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    skip_reason: str | None
    covered_by: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def shell_blocks(path: Path) -> list[Block]:
    """The fenced shell blocks of ``path`` (indented fences too), each with its ``not-run`` tag if any."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening or not opening["info"]:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        if opening["info"] in SHELL_INFOS:
            indent = len(opening["indent"])
            code = "\n".join(line[indent:] if line[:indent].isspace() else line.lstrip() for line in lines[i + 1:end])
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            tag = NOT_RUN.match(previous)
            if "not-run" in previous and not tag:
                raise AssertionError(f"{path}:{i}: malformed tag {previous.strip()!r}; expected "
                                     f"'<!-- not-run: <reason>; covered by <tests/...py[::test]> -->'")
            blocks.append(Block(path, i + 1, code, tag["reason"] if tag else None, tag["cover"] if tag else None))
        i = end + 1
    return blocks


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in shell_blocks(path)]


def test_blocks_are_found_and_make_commands_that_install_are_left_out():
    blocks = all_blocks()
    assert any(b.path.name == "README.md" and "--select activations" in b.code and b.skip_reason is None
               for b in blocks), "the README's CLI walkthrough is not among the blocks that run"
    problems = [problem for block in blocks if block.skip_reason is None for problem in [unfit(block)] if problem]
    assert not problems, "\n".join(problems)


def unfit(block: Block) -> str | None:
    """Why ``block`` must not run here untagged (None: it may)."""
    makes = re.findall(r"^\s*make\s+(\S+)", block.code, re.M)
    if not set(makes) <= MAKE_WITHOUT_INSTALL:
        # e.g. `make demo` would run `pip install -e .` from the temporary clone and repoint the .venv at it
        return f"{block.where}: `make {' '.join(makes)}` installs things; tag the block not-run with its reason"
    code = re.sub(r"(^|\s)#.*$", "", block.code, flags=re.M)  # comments
    if re.search(r"(^|[;&|(])\s*dagster\s", code, re.M):
        return f"{block.where}: a bare `dagster` is not on a fresh clone's PATH; write .venv/bin/dagster"
    return None


def test_every_left_out_block_names_its_reason_and_a_test_that_exists():
    skipped = [b for b in all_blocks() if b.skip_reason]
    assert skipped, "no block is tagged not-run (the quick start's make commands should be)"
    for block in skipped:
        path, _, name = block.covered_by.partition("::")
        test_file = ROOT / path
        assert test_file.is_file() and path.startswith("tests/"), f"{block.where}: {block.covered_by} is no test file"
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", test_file.read_text(encoding="utf-8"), re.M), (
                f"{block.where}: {path} has no test {name}")


def test_the_tag_parser_leaves_out_tagged_blocks_only(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n<!-- not-run: needs a GPU; covered by tests/test_assets.py -->\n```bash\nnvidia-smi\n"
                   "```\n\n```bash\necho hi\n```\n\n- item\n\n  ```bash\n  echo indented\n  ```\n\n```python\nx\n```\n")
    blocks = shell_blocks(doc)
    assert [(b.code, b.skip_reason) for b in blocks] == [
        ("nvidia-smi", "needs a GPU"), ("echo hi", None), ("echo indented", None)]
    doc.write_text("<!-- not-run: no cover given -->\n```bash\nx\n```\n")
    with pytest.raises(AssertionError, match="malformed tag"):
        shell_blocks(doc)


def fresh_clone(folder: Path) -> Path:
    """``folder`` with links to every tracked top-level entry of the repository and to its ``.venv``."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted({line.split("/", 1)[0] for line in tracked.splitlines() if line} | {".venv"}):
        if (ROOT / name).exists() and name not in ("data", ".dagster_home"):
            (folder / name).symlink_to(ROOT / name)
    return folder


def script_of(blocks: list[Block]) -> str:
    parts = ["set -euo pipefail"]
    for block in blocks:
        parts.append(f"echo \"::block {block.where} $(date +%s)\" >&2")
        parts.append(block.code)
    parts.append('echo "::end $(date +%s)" >&2')
    return "\n".join(parts) + "\n"


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "dagster").exists(), reason="needs `make setup` (.venv)")
def test_the_docs_commands_run_in_order_on_a_fresh_clone(tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    runnable = [b for b in all_blocks() if b.skip_reason is None]
    unsafe = [problem for problem in map(unfit, runnable) if problem]
    assert not unsafe, "not run (untagged blocks that must not run here):\n" + "\n".join(unsafe)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDR_", "DAGSTER_"))}
    # what a fresh clone has by default: ./data under the clone (the editable install's default is the
    # repository's own data/, so it is named), no instance until the README exports one
    env.update(DDR_DATA_ROOT=str(clone / "data"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start, cpu_start = time.monotonic(), children_cpu_seconds()
    result = subprocess.run(["bash", "-c", script_of(runnable)], cwd=clone, env=env, capture_output=True, text=True,
                            timeout=BUDGET_S * 3)  # a hang guard: a loaded 2-core machine took 1030 s wall
    elapsed, cpu = time.monotonic() - start, children_cpu_seconds() - cpu_start
    ran = re.findall(r"::block (\S+)", result.stderr)
    assert result.returncode == 0, (f"the block at {ran[-1] if ran else '?'} failed (exit {result.returncode}):\n"
                                    f"{result.stderr[-4000:]}")
    assert ran == [b.where for b in runnable]
    assert (clone / ".dagster_home").is_dir(), "the README's export DAGSTER_HOME did not take effect"
    assert (clone / "data" / "outputs" / "default" / "_records" / "html_export" / "tiny-raw.json").is_file(), (
        "the one command for a variant did not finish its graph")
    # the budget in the commands' CPU time (one thread each, OMP_NUM_THREADS=1: on an idle machine about their wall
    # time), which a busy machine does not inflate; the wall time is bounded by the timeout above
    assert cpu < BUDGET_S, (f"the docs' commands took {cpu:.0f} CPU s ({elapsed:.0f} s wall; budget {BUDGET_S} s): "
                            f"tag the long ones; wall seconds per block: {block_seconds(result.stderr)}")


def block_seconds(stderr: str) -> dict[str, int]:
    """Wall seconds of each block, from the script's ``::block <where> <epoch>`` / ``::end <epoch>`` lines."""
    marks = re.findall(r"^::(?:block (\S+)|end) (\d+)$", stderr, re.M)
    return {where: int(after) - int(at) for (where, at), (_, after) in zip(marks, marks[1:], strict=False)}
