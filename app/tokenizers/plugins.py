"""Backends: the adapter interface a tokenizer implements to be served, found through entry points.

A backend turns a model folder (its config.json, and the local files config.json points at)
into a Tokenizer (app/tokenizers/base.py: ``encode``, ``decode`` and ``info``, the metadata that
describes its tokens). Backends are discovered in the entry-point group ``tokserve.backends``:
tokserve declares its own (native, transformers, exported) in pyproject.toml, and a package
outside this repository adds one the same way, without touching tokserve::

    [project.entry-points."tokserve.backends"]
    mycodec = "mycodec_tokserve:BACKEND"      # a Backend object

A model folder names its backend in config.json (``"backend": "mycodec"``). An entry point is
imported only when a model names it, so a broken or missing plugin fails that model alone, with
a message naming the package. docs/backends.md is the guide for writing one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import torch

from app.model_folder import ModelLoadError, WeightFiles
from app.tokenizers.base import Tokenizer

ENTRY_POINT_GROUP = "tokserve.backends"

# (model folder, its config.json, device, dtype) -> the tokenizer, ready to serve on the device
Build = Callable[[Path, dict[str, Any], torch.device, torch.dtype], Tokenizer]
# (the local folder `tokserve models add --from` names, its --option values) -> config.json
Configure = Callable[[Path, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Backend:
    """One kind of model folder.

    ``build`` loads the model from local files only (never a hub) and returns a Tokenizer;
    ``weight_files`` names the files it reads outside the model folder and its ``source``
    folder, so a model's version changes with them; ``configure`` writes the config.json of
    ``tokserve models add --backend NAME`` (default: ``{"backend", "source", "options"}``).
    """

    build: Build
    weight_files: WeightFiles | None = None
    configure: Configure | None = None
    summary: str = ""


def _entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name, []).append(point)
    return found


def backend_names() -> list[str]:
    """The names of every installed backend, without importing any."""
    return sorted(_entry_points())


def _origin(point: EntryPoint) -> str:
    package = f" (package {point.dist.name})" if point.dist is not None else ""
    return f"{point.name} = {point.value}{package}"


@cache
def find_backend(name: str) -> Backend:
    """The installed backend called ``name``, imported on first use; ModelLoadError when none
    or several packages declare it, or when its entry point does not load a Backend."""
    points = {point.value: point for point in _entry_points().get(name, [])}
    if not points:
        raise ModelLoadError(
            f"unknown backend {name!r}; installed: {', '.join(backend_names())}. A backend is a "
            f"package declaring it in the entry-point group {ENTRY_POINT_GROUP!r}."
        )
    if len(points) > 1:
        origins = "; ".join(_origin(point) for point in points.values())
        raise ModelLoadError(f"backend {name!r} is declared more than once: {origins}")
    (point,) = points.values()
    try:
        loaded = point.load()
    except Exception as exc:  # a plugin's import error is the plugin's, reported as such
        raise ModelLoadError(
            f"backend {name!r} cannot be imported from {_origin(point)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(loaded, Backend):
        raise ModelLoadError(
            f"backend {name!r} from {_origin(point)} is of type {type(loaded).__name__}, not "
            "an app.tokenizers.plugins.Backend"
        )
    return loaded


def default_config(source: Path, options: dict[str, Any]) -> dict[str, Any]:
    """config.json of a backend with no ``configure``: the source folder and the options."""
    return {"source": str(source), "options": options}
