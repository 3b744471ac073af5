"""Loading the Dagster definitions (and the ``ddr`` CLI) imports no heavy library (ddr_core.lazy_imports).

Every ``dagster`` CLI call, code server, daemon, run and step worker loads ``dagster_project.definitions``;
importing torch, scipy.signal and matplotlib there cost about 4 CPU seconds per process. The stages import them
when they compute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HEAVY = ("torch", "scipy", "matplotlib", "diffusers", "transformers", "streamlit")
"""Written out here (not read from ddr_core.lazy_imports) so that the test states the rule on its own."""


def _heavy_imported_by(statement: str) -> list[str]:
    """The heavy top-level modules in ``sys.modules`` after ``statement``, run in a fresh interpreter."""
    code = f"{statement}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])  # a list of str printed by the child


@pytest.mark.parametrize("module", ["dagster_project.definitions", "ddr_core.cli", "dagster_project.demo",
                                    "dagster_project.launcher", "dagster_project.variant"])
def test_loading_imports_no_heavy_library(module):
    heavy = _heavy_imported_by(f"import {module}")
    assert heavy == [], (
        f"`import {module}` imported {heavy}: every dagster CLI call / code server / worker pays for it. Import "
        "it inside the function that computes, or through ddr_core.lazy_imports.lazy_module (run "
        f"`python -X importtime -c 'import {module}'` to see who imports it).")


def test_the_definitions_still_hold_every_asset_and_config():
    """The lazy imports change no registry: the assets, their config schemas and the jobs are all there."""
    from dagster_project.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"activations", "timestep_stats", "priors", "dreams", "activity_plots", "cfg_contrast"} <= keys
    capture = graph.get(next(k for k in graph.get_all_asset_keys() if k.to_user_string() == "activations"))
    assert capture is not None
    assert defs.resolve_all_job_defs()


def test_a_lazy_module_imports_on_first_use():
    code = ("import sys\nfrom ddr_core.lazy_imports import lazy_module\n"
            "m = lazy_module('xml.dom.minidom')\nbefore = 'xml.dom.minidom' in sys.modules\n"
            "doc = m.parseString('<a/>')\nprint(before, 'xml.dom.minidom' in sys.modules, doc.documentElement.tagName,"
            " m.parseString is sys.modules['xml.dom.minidom'].parseString)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "a", "True"]


def test_lazy_no_grad_turns_gradients_off_and_keeps_the_function():
    import torch

    from ddr_core.lazy_imports import no_grad

    @no_grad
    def double(x: torch.Tensor) -> torch.Tensor:
        """Twice x."""
        return x * 2

    x = torch.ones(2, requires_grad=True)
    assert not double(x).requires_grad and (x * 2).requires_grad
    assert double.__doc__ == "Twice x." and double.__name__ == "double"


def test_required_hooks_table_matches_the_basis_classes():
    """Config validation reads REQUIRED_HOOKS (no import of the SAE modules); the classes stay the authority."""
    from ddr_core.basis import BASES, REQUIRED_HOOKS, basis_class, basis_required_hook

    assert set(REQUIRED_HOOKS) == set(BASES.values())
    for kind in BASES:
        assert basis_required_hook(kind) == basis_class(kind).required_hook, kind
    assert basis_required_hook("sdxl-unbox") == "residual"
    with pytest.raises(ValueError, match="unknown basis 'nope'; known: raw"):
        basis_required_hook("nope")


def test_each_family_names_a_torch_dtype_for_auto_on_cuda():
    import torch

    from ddr_core.families import FAMILY_MODULES, family_class

    dtypes = {name: getattr(torch, family_class(name).cuda_auto_dtype) for name in FAMILY_MODULES}
    assert dtypes == {"sd": torch.float16, "sdxl": torch.float16, "flux": torch.bfloat16}
