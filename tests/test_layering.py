"""The package layers (docs/ARCHITECTURE.md "Packages"): ``ddr_core`` < ``ddr_resources`` < ``ddr_assets`` <
``dagster_project``; and no private API of dagster-slurm in the project.

Static checks over the source (``ast``), so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dagster_slurm

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = ("ddr_core", "ddr_resources", "ddr_assets", "dagster_project")


def _modules(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, at any depth (``from x import y`` gives ``x`` and
    ``x.y``: ``y`` may be a module); relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _violations(folders: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for path in _modules(*folders) for line, name in _imported(path)
            if any(name == top or name.startswith(top + ".") for top in forbidden)]


def test_nothing_below_dagster_project_imports_it():
    """Definitions, jobs, the executor and the launcher sit on top: the assets, the resources and the core
    never reach up to them (the resources lived in dagster_project/ while the assets imported them)."""
    assert _violations(("ddr_core", "ddr_resources", "ddr_assets"), ("dagster_project",)) == []


def test_ddr_core_never_imports_dagster():
    assert _violations(("ddr_core",), ("dagster", "dagster_slurm", "dagster_pipes", "dagster_webserver")) == []


def test_the_resources_import_no_assets():
    """The instance imports dagster_project.worker_guard (its run launcher) in the webserver and the daemon;
    that pulls in ddr_resources.run_guard, which must not drag the asset graph (torch, the config) along."""
    assert _violations(("ddr_resources",), ("ddr_assets", "dagster_project")) == []


def test_the_resource_modules_moved_without_a_shim():
    for name in ("resources", "slurm", "slurm_payload"):
        assert not (ROOT / "dagster_project" / f"{name}.py").exists(), name
    old = ("dagster_project.resources", "dagster_project.slurm", "dagster_project.slurm_payload")
    assert _violations(PROJECT_DIRS + ("tests", "benchmarks", "scripts"), old) == []


def _private_methods_of_dagster_slurm() -> set[str]:
    """Names of the private functions and methods defined anywhere in the installed dagster-slurm."""
    names = set()
    for path in Path(dagster_slurm.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_")
                    and not node.name.startswith("__")):
                names.add(node.name)
    return names


def test_no_private_dagster_slurm_api_is_used():
    """dagster-slurm is pinned, but its private helpers (``client._get_remote_run_dir``, ...) change without
    notice: only its public API and our own configuration. A name our own module defines is ours."""
    private = _private_methods_of_dagster_slurm()
    assert {"_get_remote_run_dir", "_get_remote_base"} <= private  # the check can see what it looks for
    problems = []
    for path in _modules(*PROJECT_DIRS):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private and node.attr not in own:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}")
        for line, name in _imported(path):
            parts = name.split(".")
            if parts[0] == "dagster_slurm" and any(p.startswith("_") for p in parts[1:]):
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert problems == []
