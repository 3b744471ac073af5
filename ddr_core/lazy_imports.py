"""Heavy third-party modules imported on first use, so loading the Dagster definitions stays cheap.

Every process that loads ``dagster_project.definitions`` (each ``dagster`` CLI call, the code server, the
daemon, every run and step worker) imports the asset modules and, through them, the ``ddr_core`` modules that
hold the stages' config models. Importing torch, scipy.signal and matplotlib there cost about 4 CPU seconds per
process although only the stage that computes needs them. A module that uses torch only inside functions and
in annotations writes::

    from typing import TYPE_CHECKING

    if TYPE_CHECKING:  # type checkers and IDEs see the real module
        import torch
    else:
        torch = lazy_module("torch")

and ``torch.zeros(...)`` imports torch on its first call. Module-level uses (a base class ``nn.Module``, a
decorator ``@torch.no_grad()``, a default argument ``dtype=torch.float32``, a type alias evaluated at import)
import it at once, defeating the point: write such aliases with string forward references and keep classes
that subclass torch types in modules the definitions do not load. ``tests/test_lazy_imports.py`` fails when the
definitions import any of :data:`HEAVY_MODULES`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, ParamSpec, TypeVar

HEAVY_MODULES: tuple[str, ...] = ("torch", "scipy", "matplotlib", "diffusers", "transformers", "streamlit")
"""Modules that loading ``dagster_project.definitions`` (and the ``ddr`` CLI entry points) must not import."""

P = ParamSpec("P")
R = TypeVar("R")


class LazyModule(ModuleType):
    """Stands for the module ``name`` and imports it on the first attribute read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self.__dict__["_lazy_target"])
        # Later reads skip this method: the module's public names are copied in once it is imported.
        self.__dict__.update({key: value for key, value in vars(module).items() if not key.startswith("__")})
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_lazy_target']!r}>"


def lazy_module(name: str) -> ModuleType:
    """The module ``name``, imported when an attribute of it is first read (see the module docstring)."""
    return LazyModule(name)


def no_grad(function: Callable[P, R]) -> Callable[P, R]:
    """``@torch.no_grad()`` for a plain (non-generator) function, importing torch at the first call, not at import."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return wrapper
