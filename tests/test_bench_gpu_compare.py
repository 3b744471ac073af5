"""``benchmarks/bench_gpu.py --compare`` (issue #19 item 5): its arguments, and a CPU smoke run of today's path
vs a tuned one in one run with ratios (numbers meaningless on CPU; the GPU run is the lead's, see
docs/GPU_EFFICIENCY.md, scripts/gpu_check_issue19.sh)."""

from __future__ import annotations

import json

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_gpu")


def test_compare_arguments_default_and_are_checked_before_any_model_is_built(bench, capsys):
    gpu = bench._parse(["--compare"])
    assert gpu.tuned == bench.DEFAULT_TUNED_GPU and (gpu.tuned_batch, gpu.tuned_image_batch) == (128, 32)
    cpu = bench._parse(["--compare", "--quick", "--device", "cpu"])
    assert cpu.tuned == bench.DEFAULT_TUNED_CPU and (cpu.tuned_batch, cpu.tuned_image_batch) == (4, 4)
    assert bench._parse(["--tuned", '{"compile": "blocks"}', "--tuned", "{}"]).tuned == ['{"compile": "blocks"}', "{}"]
    for bad, message in ((["--tuned", "{not json"], "--tuned"), (["--tuned", '{"compile": "all"}'], "compile"),
                         (["--tuned", '{"compile_mode": "max-autotune-no-cudagraphs"}'], "compile is 'off'"),
                         (["--tuned-batch", "0"], "--tuned-batch must be >= 1")):
        with pytest.raises(SystemExit):
            bench._parse(bad)
        assert message in capsys.readouterr().err


@pytest.mark.usefixtures("one_torch_thread")
def test_compare_smoke_on_cpu_times_both_paths_in_one_run(bench, tmp_path, capsys):
    out = tmp_path / "compare.json"
    results = bench.main(["--compare", "--quick", "--device", "cpu", "--dtype", "fp32", "--steps", "2",
                          "--dream-steps", "2", "--batch", "2", "--image-batch", "2", "--tuned-batch", "3",
                          "--tuned-image-batch", "3", "--tuned", '{"channels_last": true, "fuse_qkv": true}',
                          "--out", str(out)])
    assert set(results["sections"]) == {"flops", "setup", "compare"}  # only the comparison ran
    paths = results["sections"]["compare"]["paths"]
    assert list(paths) == ["today", "tuned1"]
    assert paths["today"]["performance"] == {} and paths["tuned1"]["performance"] == {"channels_last": True,
                                                                                       "fuse_qkv": True}
    assert (paths["tuned1"]["dream_batch"], paths["tuned1"]["image_batch"]) == (3, 3)
    for what in ("dreams", "capture"):
        assert paths["today"][what]["status"] == "ok" and paths["tuned1"][what]["status"] == "ok"
        assert paths["today"][what]["ratio_to_today"] == 1.0
        assert paths["tuned1"][what]["ratio_to_today"] > 0 and "meets_target" in paths["tuned1"][what]
    # capture with the recording's per-step copies (before issue #19) vs one copy per batch, same run
    copies = results["sections"]["compare"]["host_copies"]
    assert copies["status"] == "ok" and copies["same_values"] is True and copies["batch"] == 2
    assert list(copies["paths"]) == ["per_step", "per_batch"]
    for row in copies["paths"].values():
        assert row["images_per_s"] > 0 and len(row["rounds_seconds"]) == bench.HOST_COPY_ROUNDS
        assert row["syncs_2_steps"] is None  # counted on CUDA only
    assert copies["paths"]["per_batch"]["ratio_to_per_step"] > 0
    summary = capsys.readouterr().out
    assert "tuned1  dreams" in summary and "vs today" in summary and "target 35%" in summary
    assert "host_copies=per_step (before issue #19)" in summary and "vs per_step" in summary
    assert json.loads(out.read_text())["sections"]["compare"]["target_mfu"] == {"dreams": 0.35, "capture": 0.30}


def test_the_gpu_check_script_parses_and_passes_bench_arguments_through():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check_issue19.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert '"${BENCH_EXTRA[@]}"' in text and "SKIP_TESTS" in text  # its CPU smoke path (see its header)
