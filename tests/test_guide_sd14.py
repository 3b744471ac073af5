"""docs/GUIDE_SD14.md works when pasted: its commands, extracted from the file, run in order on SD v1.4's architecture.

The real weights cannot run here, so the guide's ``/path/to/...`` values point at a diffusers folder of the SD v1.4
architecture with random weights and a random SAE of SAeUron's size (tests/sd14_random.py), and only the run
sizes are shrunk (2 prompts, 1 image, 2 steps, 64 x 64 pixels, 1 prior / dream per channel). Each replacement must
match the guide's text, so an edited command fails here until the test follows it. Blocks fenced as
```` ```bash no-test ```` (GPU checks, servers, SSH) are left out.

The run is one test, marked ``slow``, that runs only with ``DDR_CHECK_GUIDE_SD14=1``: ``scripts/check_guide_sd14.sh``
(run by ``.ci/run``) sets it. It took 314 s wall (357 CPU-s) on the 2-core dev machine at load 1-4, over the
~4 minutes ``make test`` can spend on it: 17 Dagster commands at ~13-15 s of start-up each, the model stages
20-33 s. ``make test`` runs the two fast tests below (the extraction) and skips the run, naming the script.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddr_core.channel_store import channel_dir
from tests.sd14_random import build_saeuron_random, build_sd14_random, write_prompts

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "GUIDE_SD14.md"
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
_BLOCK = re.compile(r"^```bash([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def guide_script(guide: str = "") -> str:
    """The guide's ``bash`` blocks not marked ``no-test``, in order, joined into one script."""
    text = guide or GUIDE.read_text(encoding="utf-8")
    blocks = [body for info, body in _BLOCK.findall(text) if "no-test" not in info.split()]
    assert blocks, f"{GUIDE} has no bash block to run"
    return "\n".join(blocks)


def shrink(script: str, replacements: list[tuple[str, str]]) -> str:
    """Apply ``replacements``; each must occur in the script (so a changed command fails the test)."""
    for old, new in replacements:
        assert old in script, f"the guide no longer contains {old!r}: update tests/test_guide_sd14.py with it"
        script = script.replace(old, new)
    return script


def command_times(trace: str, ended: float) -> str:
    """``seconds  command`` per top-level command of a ``bash -x`` trace whose PS4 holds ``$EPOCHREALTIME``."""
    starts = [(float(m.group(1)), m.group(2)[:110])
              for m in re.finditer(r"^\+\[(\d+\.\d+)\] (.*)$", trace, re.MULTILINE)]
    ends = [s for s, _ in starts[1:]] + [ended] if starts else []
    return "\n".join(f"{end - start:7.1f}  {command}" for (start, command), end in zip(starts, ends, strict=True))


def test_guide_script_extraction_skips_no_test_blocks() -> None:
    text = "x\n```bash\necho one\n```\n```bash no-test\nnvidia-smi\n```\n```python\nprint(1)\n```\n"
    assert guide_script(text).strip() == "echo one"


def test_guide_commands_are_extracted() -> None:
    script = guide_script()
    for stage in ("models", "saes", "prompt_datasets", "activations", "timestep_stats", "priors", "dreams",
                  "representation_shards", "html_export"):
        assert f"--select {stage} " in script, f"the guide does not run {stage}"
    assert "make setup" not in script and "make inspect" not in script  # GPU / server blocks are no-test


@pytest.fixture
def guide_dir(tmp_path: Path):
    """``tmp_path``, emptied afterwards of the ~4.5 GB of weights and their provisioned copies (pytest keeps the
    last three temporary folders; the small outputs stay for a look after a failure)."""
    yield tmp_path
    for big in ("stable-diffusion-v1-4", "SAeUron", "ddr-data/assets"):
        shutil.rmtree(tmp_path / big, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DDR_CHECK_GUIDE_SD14"),
                    reason="about 5 min on a 2-core machine (17 Dagster commands, an 860 M-parameter UNet): "
                           "scripts/check_guide_sd14.sh runs it (so does .ci/run)")
def test_guide_sd14_runs_on_random_sd14_architecture(guide_dir: Path) -> None:
    tmp_path = guide_dir
    started = time.monotonic()
    sd14 = build_sd14_random(tmp_path / "stable-diffusion-v1-4", PROMPTS)
    build_saeuron_random(tmp_path / "SAeUron")
    prompts = write_prompts(tmp_path / "prompts" / "UnlearnCanvasMetadata.jsonl", PROMPTS)
    data = tmp_path / "ddr-data"
    built_s = time.monotonic() - started
    venv_bin = f"{Path(sys.executable).parent}/"
    script = shrink(guide_script(), [
        ("/path/to/stable-diffusion-v1-4", str(sd14)),
        ("/path/to/SAeUron", str(tmp_path / "SAeUron")),
        ("/path/to/UnlearnCanvasMetadata.jsonl", str(prompts)),
        ("/path/to/ddr-data", str(data)),
        ('"n_prompts": 1000, "num_images_per_prompt": 5, "num_inference_steps": 50, "height": 512, "width": 512, '
         '"batch_size": 8',
         '"n_prompts": 2, "num_images_per_prompt": 1, "num_inference_steps": 2, "height": 64, "width": 64, '
         '"batch_size": 2'),
        ('"n_results": 5, "num_inference_steps": 50, "height": 512, "width": 512',
         '"n_results": 1, "seeds": [1024], "num_inference_steps": 2, "height": 64, "width": 64'),
        ('"n_results": 5, "num_steps": 100, "batch_size": 64, "dtype": "bfloat16"',  # bfloat16: for the GPU
         '"n_results": 1, "num_steps": 2, "batch_size": 4, "use_just_one_timestep": true, "snapshot_every": 0, '
         '"quality_noise_draws": 1, "dtype": "float32"'),
        (".venv/bin/", venv_bin),
    ])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DDR_", "DAGSTER_", "HF_")) and k not in ("SD14_DIR", "SAEURON_DIR", "PROMPTS_JSONL")}
    # bash -x: each command with its start time (bash ignores PS4 from the environment when run as root)
    (tmp_path / "guide.sh").write_text("PS4='+[$EPOCHREALTIME] '\n" + script, encoding="utf-8")
    result = subprocess.run(["bash", "-xeuo", "pipefail", str(tmp_path / "guide.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1200)
    timings = command_times(result.stderr, time.time())
    log = result.stdout[-4000:] + "\n--- stderr ---\n" + result.stderr[-6000:] + "\n--- seconds per command ---\n" + timings
    assert result.returncode == 0, f"a command of {GUIDE.name} failed:\n{log}"
    print(timings)

    outputs = data / "outputs" / "default"
    assert len(list((outputs / "activations" / "sd-v1-4" / "images").glob("gen_*.png"))) == 2
    chosen = dict(line.split("=", 1) for line in (data / "chosen_channels.sh").read_text().split())
    for variant, name in (("sd14-raw", "RAW"), ("sd14-sae", "SAE")):
        assert chosen[f"{name}_BLOCK"].startswith(f"{variant}:"), chosen
        channels = [int(c) for c in chosen[f"{name}_CHANNELS"].split(",")]
        assert 1 <= len(channels) <= 2, chosen  # 2 where the block has 2 active (few generations here)
        for channel in channels:  # drawn, not skipped as inactive
            assert list(channel_dir(outputs / "priors" / variant, channel).glob("seed_*.png")), (variant, channel)
            assert list(channel_dir(outputs / "dreams" / variant, channel).rglob("seed_*.png")), (variant, channel)
            assert (outputs / "representation" / variant / f"{channel_dir(Path(), channel).name}.json").is_file()
        assert (outputs / "html_export" / variant / "index.html").is_file()
    store = sum(f.stat().st_size for f in (outputs / "activations").rglob("*") if f.is_file())
    cpu = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    print(f"guide run: fixtures {built_s:.0f} s, total {time.monotonic() - started:.0f} s wall, "
          f"{cpu:.0f} CPU-s (this pytest process and its children), capture store {store / 1e6:.1f} MB "
          f"for 2 generations x 2 steps")
