"""Grid spec of the comparison runner: parsing and validation, the cells it defines, each cell's ``anomalib train``
arguments and fingerprint."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RESULT_FILE = "result.json"
EXAMPLES_FILE = "examples.npz"
JOB_FILE = "job.json"
LOG_FILE = "log.txt"
NO_CATEGORY = "-"


class GridSpecError(ValueError):
    """The grid spec file is malformed; the message says which entry and what was expected."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the grid: an Anomalib config file and/or an inline ``class_path`` spec, plus CLI overrides."""

    name: str
    config: Path | None = None
    model: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    categories: tuple[str, ...] | None = None  # only these categories (e.g. those its paper reports); None: all

    def runs_on(self, category: str | None) -> bool:
        return self.categories is None or category is None or category in self.categories


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the grid: an Anomalib datamodule spec (``class_path``/``init_args``) and its categories."""

    name: str
    data: dict[str, Any]
    categories: tuple[str | None, ...] = (None,)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid spec (see ``docs/comparison.md``)."""

    path: Path
    models: tuple[ModelEntry, ...]
    datasets: tuple[DatasetEntry, ...]
    seeds: tuple[int, ...] = (0,)
    overrides: dict[str, Any] = field(default_factory=dict)
    output: Path = Path("results/compare")
    timeout: float | None = None
    num_examples: int = 3


@dataclass(frozen=True)
class Cell:
    """One model x dataset x category x seed run."""

    model: ModelEntry
    dataset: DatasetEntry
    category: str | None
    seed: int

    @property
    def label(self) -> str:
        return f"{self.model.name} / {self.dataset.name} / {self.category or NO_CATEGORY} / seed {self.seed}"

    def directory(self, output: Path) -> Path:
        parts = (self.model.name, self.dataset.name, self.category or NO_CATEGORY, f"seed{self.seed}")
        return output.joinpath("cells", *(safe_name(part) for part in parts))


def safe_name(text: str) -> str:
    """``text`` as a file-name-safe token."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def _require_mapping(value: Any, where: str) -> dict[str, Any]:  # noqa: ANN401
    if value is None:
        return {}
    if not isinstance(value, dict):
        msg = f"{where} must be a mapping, got {type(value).__name__}: {value!r}"
        raise GridSpecError(msg)
    return value


def _resolve_path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def load_grid(path: str | Path) -> GridSpec:
    """Read and validate a grid spec. Config paths inside it are relative to the spec file's folder."""
    path = Path(path)
    if not path.is_file():
        msg = f"Grid spec not found: {path}"
        raise FileNotFoundError(msg)
    raw = _require_mapping(yaml.safe_load(path.read_text()), str(path))
    unknown = set(raw) - {"output", "seeds", "overrides", "timeout", "num_examples", "models", "datasets"}
    if unknown:
        msg = f"{path}: unknown top-level keys {sorted(unknown)}; expected output, seeds, overrides, timeout, num_examples, models, datasets."
        raise GridSpecError(msg)
    base = path.parent.resolve()
    models = []
    for index, entry in enumerate(raw.get("models") or []):
        where = f"{path}: models[{index}]"
        entry = _require_mapping(entry, where)
        if "name" not in entry or not ("config" in entry or "model" in entry):
            msg = f"{where} needs a `name` and a `config` (Anomalib config file) and/or a `model` (class_path spec)."
            raise GridSpecError(msg)
        config = _resolve_path(entry["config"], base) if entry.get("config") else None
        if config is not None and not config.is_file():
            msg = f"{where}: config file {config} not found (paths are relative to the spec file's folder {base})."
            raise GridSpecError(msg)
        model = entry.get("model")
        if isinstance(model, str):
            model = {"class_path": model}
        models.append(
            ModelEntry(
                name=str(entry["name"]),
                config=config,
                model=_require_mapping(model, f"{where}.model") or None,
                overrides=_require_mapping(entry.get("overrides"), f"{where}.overrides"),
                categories=None if entry.get("categories") is None else tuple(map(str, entry["categories"])),
            )
        )
    datasets = []
    for index, entry in enumerate(raw.get("datasets") or []):
        where = f"{path}: datasets[{index}]"
        entry = _require_mapping(entry, where)
        data = entry.get("data")
        if isinstance(data, str):
            data = {"class_path": data}
        if "name" not in entry or not isinstance(data, dict) or "class_path" not in data:
            msg = f"{where} needs a `name` and a `data` mapping with `class_path` (and optional `init_args`)."
            raise GridSpecError(msg)
        categories = entry.get("categories") or [None]
        if not isinstance(categories, list):
            categories = [categories]
        datasets.append(
            DatasetEntry(
                name=str(entry["name"]),
                data=data,
                categories=tuple(None if category is None else str(category) for category in categories),
                overrides=_require_mapping(entry.get("overrides"), f"{where}.overrides"),
            )
        )
    if not models or not datasets:
        msg = f"{path}: the grid needs at least one entry under `models` and one under `datasets`."
        raise GridSpecError(msg)
    known = {category for dataset in datasets for category in dataset.categories}
    for model in models:
        unknown = sorted(set(model.categories or ()) - known)
        if unknown:
            msg = f"{path}: model {model.name!r} lists categories {unknown} that no dataset has ({sorted(known - {None})})."
            raise GridSpecError(msg)
    for kind, names in (("model", [m.name for m in models]), ("dataset", [d.name for d in datasets])):
        if len(set(names)) != len(names):
            msg = f"{path}: {kind} names must be unique, got {names}."
            raise GridSpecError(msg)
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not seeds or not all(isinstance(seed, int) for seed in seeds):
        msg = f"{path}: `seeds` must be an integer or a list of integers, got {seeds!r}."
        raise GridSpecError(msg)
    return GridSpec(
        path=path,
        models=tuple(models),
        datasets=tuple(datasets),
        seeds=tuple(seeds),
        overrides=_require_mapping(raw.get("overrides"), f"{path}: overrides"),
        output=Path(raw.get("output", "results/compare")),
        timeout=None if raw.get("timeout") is None else float(raw["timeout"]),
        num_examples=int(raw.get("num_examples", 3)),
    )


def grid_cells(grid: GridSpec) -> list[Cell]:
    """All cells in a stable order: dataset, category, seed, then model (so one category's models finish together);
    a model with its own ``categories`` list runs only on those."""
    return [
        Cell(model, dataset, category, seed)
        for dataset in grid.datasets
        for category in dataset.categories
        for seed in grid.seeds
        for model in grid.models
        if model.runs_on(category)
    ]


def _cli_value(value: Any) -> str:  # noqa: ANN401
    """A YAML/JSON value as one command-line token for jsonargparse."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    return str(value)


def _override_arguments(overrides: dict[str, Any]) -> list[str]:
    arguments: list[str] = []
    for key, value in overrides.items():
        arguments += [f"--{key.lstrip('-')}", _cli_value(value)]
    return arguments


def cell_arguments(grid: GridSpec, cell: Cell) -> list[str]:
    """The ``anomalib train`` arguments of a cell, in order of precedence (later wins).

    model config file < inline ``model`` spec < dataset ``data`` and category < grid ``overrides`` < dataset
    ``overrides`` < model ``overrides`` < seed. Overrides come after the classes they refer to, so ``model.*`` and
    ``data.*`` keys work whether the class comes from a config file or an inline spec.
    """
    arguments: list[str] = []
    if cell.model.config is not None:
        arguments += ["--config", str(cell.model.config)]
    if cell.model.model is not None:
        arguments += ["--model", json.dumps(cell.model.model)]
    arguments += ["--data", json.dumps(cell.dataset.data)]
    if cell.category is not None:
        arguments += ["--data.category", cell.category]
    arguments += _override_arguments(grid.overrides)
    arguments += _override_arguments(cell.dataset.overrides)
    arguments += _override_arguments(cell.model.overrides)
    arguments += ["--seed_everything", str(cell.seed)]
    return arguments


def cell_fingerprint(grid: GridSpec, cell: Cell) -> str:
    """Hash of everything that defines a cell's result: its arguments and the contents of its config file."""
    digest = hashlib.sha256(json.dumps([cell_arguments(grid, cell), grid.num_examples]).encode())
    if cell.model.config is not None:
        digest.update(cell.model.config.read_bytes())
    return digest.hexdigest()[:16]
