"""What a training workdir says about itself: the config it ran with, its categories, and whether it finished.

Process 0 writes these files when training starts (and the completion marker after the final
evaluation), so that evaluation, export, prediction and sweeps need nothing but the workdir: no config
file, no dataset. Every path may be a bucket (``gs://...``).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from atss_jax import errors

CONFIG_FILE = "config.json"
# The dataset's category ids and names in label order, so that export and prediction need no dataset.
CATEGORIES_FILE = "categories.json"
# Written after the last step's checkpoint and evaluation: a sweep skips such runs and resumes the others.
FINISHED_FILE = "finished.json"


class WorkdirError(errors.Refusal, FileNotFoundError):
    """The workdir lacks a file it should hold, or the file is corrupt."""


def _read_json(path: epath.Path, what: str) -> Any:
    if not path.exists():
        raise WorkdirError(f"{path} is missing: {path.parent} is not a training workdir of this version "
                           f"(no {what}).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WorkdirError(f"{path} is corrupt ({error}).") from None


def _tuples(value: Any) -> Any:
    """JSON gives lists; the configs hold tuples (hashable, so they can be static arguments of jit)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def write_config(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config (command-line overrides applied); logs what changed since the last run."""
    path = epath.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = json.loads(config.to_json())
    if path.exists():
        previous = _flatten(json.loads(path.read_text()))
        changed = {k: (previous.get(k), v) for k, v in _flatten(resolved).items() if previous.get(k) != v}
        for key, (old, new) in sorted(changed.items()):
            logging.warning("Config changed since the workdir's last run: %s: %r -> %r", key, old, new)
    path.write_text(json.dumps(resolved, indent=1))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
    """The config a run was trained with, as written by `write_config` (locked: a misspelt key is an error)."""
    return ml_collections.ConfigDict(_tuples(_read_json(epath.Path(workdir) / CONFIG_FILE, "config"))).lock()


def write_categories(workdir: str | epath.Path, category_ids: tuple[int, ...], category_names: tuple[str, ...]) -> None:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / CATEGORIES_FILE).write_text(json.dumps({"category_ids": list(category_ids),
                                                    "category_names": list(category_names)}, indent=1))


def read_categories(workdir: str | epath.Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(category ids, category names) in label order, as training wrote them."""
    categories = _read_json(epath.Path(workdir) / CATEGORIES_FILE, "categories")
    return tuple(categories["category_ids"]), tuple(categories["category_names"])


def mark_finished(workdir: str | epath.Path, step: int, metrics: dict[str, float] | None) -> None:
    (epath.Path(workdir) / FINISHED_FILE).write_text(json.dumps({"step": step, "metrics": metrics}, indent=1))


def finished(workdir: str | epath.Path) -> dict | None:
    """{"step", "metrics"} of the final evaluation if the run in ``workdir`` finished, else None."""
    path = epath.Path(workdir) / FINISHED_FILE
    return _read_json(path, "completion marker") if path.exists() else None
