"""Fine-tuning from a detector: a fresh training's variables with a trained detector's weights loaded
(``config.init_from``: a training workdir, or one written by scripts/import_checkpoint.py).

Every variable whose path and shape are the same in both loads; the others keep their fresh initialisation and
are logged: typically the class layer (``head/cls_logits``) when the number of classes differs, which then
starts at the focal prior bias. With ``config.init_from_class_map`` the class layer's rows of the categories
both detectors have by name (the source's ``categories.json``, this config's dataset) keep their trained
weights; the other rows keep the fresh ones. `train_step.create_training` calls `load_initial_variables`; a
resumed run then restores its own checkpoint over it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from atss_jax import checkpoint, errors, workdirs
from atss_jax.anchors import anchors_per_location
from atss_jax.models.detector import abstract_variables, build_detector

# The classifier: its output channels are (anchor, class) pairs, anchor-major.
CLASS_LAYER = ("params", "head", "cls_logits")


def source_variables(workdir: str) -> dict:
    """The latest checkpoint's model variables of ``workdir`` (as numpy), built from its own config.json."""
    source_config = workdirs.read_config(workdir)
    model = build_detector(source_config.model, anchors_per_location(source_config.anchors))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = checkpoint.restore_variables(workdir, abstract_variables(model, (64, 64), sharding))
    return jax.device_get(restored.variables)


def map_class_rows(fresh: np.ndarray, trained: np.ndarray, target_names: Sequence[str],
                   source_names: Sequence[str]) -> np.ndarray:
    """The class layer's ``fresh`` array with the trained rows of the categories shared by name.

    Args:
      fresh: ``[..., A * C_target]`` the new layer's kernel or bias.
      trained: ``[..., A * C_source]`` the source's, same leading shape and anchors per location A.
      target_names, source_names: category names in label order (C_target and C_source of them).

    Returns:
      ``fresh`` with channel ``a * C_target + j`` taken from ``a * C_source + i`` where target class j and
      source class i have the same name.
    """
    num_target, num_source = len(target_names), len(source_names)
    anchors = fresh.shape[-1] // num_target
    if fresh.shape[-1] != anchors * num_target or trained.shape[-1] != anchors * num_source:
        raise errors.ConfigError(f"class layer of {fresh.shape[-1]} and {trained.shape[-1]} channels does not fit "
                                 f"{num_target} and {num_source} categories with the same anchors per location")
    source_index = {name: i for i, name in enumerate(source_names)}
    mapped = np.array(fresh, copy=True)
    for j, name in enumerate(target_names):
        if name in source_index:
            for a in range(anchors):
                mapped[..., a * num_target + j] = trained[..., a * num_source + source_index[name]]
    return mapped


def merge_variables(fresh: Mapping[str, Any], trained: Mapping[str, Any],
                    class_names: tuple[Sequence[str], Sequence[str]] | None = None) -> tuple[dict, list[str]]:
    """``fresh`` with every leaf of ``trained`` at the same path and of the same shape.

    Args:
      fresh: the new detector's initial variables.
      trained: the source detector's variables.
      class_names: (target, source) category names: the class layer's shared rows are mapped by name
        (`map_class_rows`); None: it loads only when its shape is the same.

    Returns:
      (the merged variables, the '/'-joined paths that kept their fresh values).
    """
    flat_trained = traverse_util.flatten_dict(trained)
    merged, kept = {}, []
    for path, value in traverse_util.flatten_dict(fresh).items():
        source = flat_trained.get(path)
        if class_names is not None and path[:3] == CLASS_LAYER and source is not None:
            merged[path] = map_class_rows(np.asarray(value), np.asarray(source), *class_names)
        elif source is not None and np.shape(source) == np.shape(value):
            merged[path] = np.asarray(source, np.asarray(value).dtype)
        else:
            merged[path] = value
            kept.append("/".join(path))
    return traverse_util.unflatten_dict(merged), kept


def load_initial_variables(config: ml_collections.ConfigDict, variables: dict) -> dict:
    """``variables`` (a fresh initialisation of ``config``'s detector) with ``config.init_from``'s weights
    loaded (see the module docstring); ``variables`` itself when ``config.init_from`` is empty."""
    if not config.init_from:
        return variables
    class_names = None
    if config.init_from_class_map:
        from atss_jax.data import pipeline  # only here: the train step imports no input pipeline

        _, source_names = workdirs.read_categories(config.init_from)
        class_names = (pipeline.categories(config.data).names, source_names)
    merged, kept = merge_variables(variables, source_variables(config.init_from), class_names)
    logging.info("Initialised from %s; kept their fresh initialisation: %s", config.init_from, kept or "none")
    return merged
