"""What every detector-checkpoint importer shares: reading a PyTorch checkpoint safely, and filling the
detector's variables from it by name with a complete check.

An importer (``mmdet_import``, ``official_import``) says, for each of the detector's variables, which key
of the source ``state_dict`` holds it and how the array is transformed (``Source``); ``fill_variables``
then takes each variable's tensor, checks its shape, and refuses a source with missing, unused or
mis-shaped keys, naming them. Our variable paths are ``(collection, module..., leaf)``, e.g.
``("params", "backbone", "layer2_0", "conv1", "kernel")`` or ``("frozen", "backbone", "bn1", "var")``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from etils import epath

from atss_jax import errors
from atss_jax.anchors import anchors_per_location
from atss_jax.models import torchvision_import
from atss_jax.models.detector import abstract_variables, build_detector

# A variable path: (collection, module..., leaf).
Path = tuple[str, ...]


class Source(NamedTuple):
    """Where one variable comes from: ``key`` of the state_dict, ``transform``-ed; ``key=None``: zeros (a
    parameter the source model does not have, e.g. the bias of a convolution followed by a norm)."""

    key: str | None
    transform: Callable[[np.ndarray], np.ndarray] = np.asarray


def conv_kernel(value: np.ndarray) -> np.ndarray:
    """PyTorch ``[O, I, kh, kw]`` -> flax ``[kh, kw, I, O]``."""
    return np.transpose(value, (2, 3, 1, 0))


def scalar(value: np.ndarray) -> np.ndarray:
    """A one-element tensor (``Scale``'s ``[1]`` or ``[]``) -> ``[]``."""
    if np.size(value) != 1:
        raise ValueError(f"expected one number, got shape {np.shape(value)}")
    return np.reshape(value, ())


# Norm leaves of this project -> PyTorch's BatchNorm/GroupNorm fields.
NORM_FIELDS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_BLOCK = re.compile(r"^layer(\d)_(\d+)$")
_BLOCK_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def resnet_source(module: tuple[str, ...], leaf: str, stem: str = "") -> tuple[str, Callable]:
    """The torchvision-layout name (``layer2.0.downsample.1.running_var``) and transform of a backbone variable.

    Args:
      module: the ``ResNet`` module path, e.g. ``("layer2_0", "downsample_bn")`` or ``("bn1",)``.
      leaf: ``kernel`` or a norm leaf (``NORM_FIELDS``).
      stem: prefix of the stem's ``conv1``/``bn1`` (the official ResNet's ``stem.``).
    """
    match = _BLOCK.match(module[0])
    if match:
        stage, index = match.groups()
        name = f"layer{stage}.{index}." + ".".join(_BLOCK_MODULES.get(part, part) for part in module[1:])
    else:
        name = stem + ".".join(module)
    if leaf == "kernel":
        return f"{name}.weight", conv_kernel
    return f"{name}.{NORM_FIELDS[leaf]}", np.asarray


def load_checkpoint(path: str | epath.PathLike) -> dict[str, np.ndarray]:
    """The ``state_dict`` of a detector checkpoint: a ``.pth`` as released (mmdetection's ``{"state_dict":
    ..., "meta": ...}``, the official ``{"model": ...}``, or the ``state_dict`` itself) or an ``.npz`` of it.

    ``.pth`` files are read with torch's ``weights_only=True``: tensors and plain containers only, nothing in
    the file runs. ``path`` may be a bucket (``gs://...``).

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file is unreadable, would run code, or holds no tensors.
    """
    file = epath.Path(path)
    if not file.exists():
        raise errors.MissingFileError(f"checkpoint {str(path)!r} does not exist")
    if str(path).endswith(".npz"):
        return torchvision_import.load_state_dict(path)
    import torch

    state = torchvision_import.torch_load_weights(io.BytesIO(file.read_bytes()), str(path))
    if isinstance(state, Mapping):
        state = state.get("state_dict", state.get("model", state))
    arrays = {str(k): v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)} \
        if isinstance(state, Mapping) else {}
    if not arrays:
        raise errors.WeightsFileError(f"{str(path)!r} holds no tensors under 'state_dict', 'model' or at its top level")
    return arrays


def fill_variables(
    abstract: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    source_of: Callable[[Path], Source],
    ignored: re.Pattern,
    what: str,
) -> dict:
    """The detector's variables filled from ``state_dict``.

    Args:
      abstract: the detector's variables (arrays or ``jax.ShapeDtypeStruct``: only shapes are read).
      state_dict: source names to arrays.
      source_of: the ``Source`` of each variable path; may raise KeyError for a variable the format lacks.
      ignored: source keys that are no weights (e.g. ``num_batches_tracked``, anchor buffers).
      what: the format, for messages ("mmdetection ATSS").

    Returns:
      ``abstract``'s structure with float32 numpy arrays.

    Raises:
      ValueError: naming every missing, mis-shaped and unused source key (e.g. a checkpoint of another
        depth, number of classes or head).
    """
    filled, used, problems = {}, set(), []
    for path, leaf in torchvision_import.leaves(abstract):
        try:
            source = source_of(path)
        except KeyError as error:
            problems.append(f"no {what} name for our variable {'/'.join(path)} ({error})")
            continue
        if source.key is None:
            torchvision_import.set_leaf(filled, path, np.zeros(leaf.shape, np.float32))
            continue
        if source.key not in state_dict:
            problems.append(f"missing {source.key} (for {'/'.join(path)})")
            continue
        used.add(source.key)
        value = np.asarray(source.transform(np.asarray(state_dict[source.key])), np.float32)
        if value.shape != tuple(leaf.shape):
            problems.append(f"{source.key}: shape {np.shape(state_dict[source.key])} does not fit "
                            f"{'/'.join(path)} {tuple(leaf.shape)}")
            continue
        torchvision_import.set_leaf(filled, path, value)
    unused = sorted(k for k in state_dict if k not in used and not ignored.search(k))
    problems += [f"unused {key}" for key in unused]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise errors.WeightsFileError(f"The {what} checkpoint does not match the model of this config ({len(problems)} "
                                      f"problems): {shown}")
    return filled


def abstract_detector_variables(config: ml_collections.ConfigDict) -> dict:
    """Shapes of the variables of ``config``'s detector (every canvas gives the same), nothing initialised."""
    model = build_detector(config.model, anchors_per_location(config.anchors))
    return abstract_variables(model, (64, 64))
