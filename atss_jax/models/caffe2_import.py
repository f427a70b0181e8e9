"""ImageNet-pretrained ResNet/ResNeXt weights from Detectron's Caffe2 pickles (``R-50.pkl``, ``R-101.pkl``,
``X-101-32x8d.pkl``, ``X-101-64x4d.pkl``), the files the official ATSS models start from.

Such a file pickles ``{"blobs": {name: array}}`` (or the blobs alone), written by Python 2: it is read
with ``safe_pickle`` (latin-1 strings, no code from the file). The network is Detectron's: BGR input
with its per-channel means and std 1 (``config.model.input_channels``, ``pixel_mean``, ``pixel_std``),
the MSRA ResNets stride in the first 1x1 convolution (``config.model.backbone.stride_in_1x1``), and
every norm is an ``AffineChannel``: a scale ``_s`` and a bias ``_b``, no statistics. Its names:

  conv1_w, res_conv1_bn_{s,b}                   -> conv1/kernel, bn1
  res{s+1}_{i}_branch2{a,b,c}_w                 -> layer{s}_{i}/conv{1,2,3}/kernel
  res{s+1}_{i}_branch2{a,b,c}_bn_{s,b}          -> layer{s}_{i}/bn{1,2,3}
  res{s+1}_{i}_branch1_w, res{s+1}_{i}_branch1_bn_{s,b} -> layer{s}_{i}/downsample_conv, downsample_bn

as the official loader renames them (``atss_core/utils/c2_model_loading.py``). Like it, this ignores
the classifier (``fc1000_*`` in the MSRA files, ``pred_*`` in the FAIR ones), solver state
(``*_momentum``), ``weight_order`` and convolution biases (the MSRA ``conv1_b``, ~1e-9: the
backbone's convolutions have none); any other name is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from atss_jax import errors, safe_pickle
from atss_jax.models.layers import FrozenBatchNorm
from atss_jax.models.torchvision_import import fill_backbone

_STEM = {"conv1": ("conv1",), "res_conv1_bn": ("bn1",)}
_BLOCK = re.compile(r"^res(\d)_(\d+)_branch(1|2[abc])(_bn)?$")
_BRANCHES = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"),
             "1": ("downsample_conv", "downsample_bn")}
_IGNORED = re.compile(r"^(fc1000_[wb]|pred_[wb]|weight_order|.*_momentum)$")


def is_caffe2_file(path: str | epath.PathLike) -> bool:
    """Whether ``path`` names a Detectron pickle (``.pkl``) rather than a torchvision ``state_dict``."""
    return str(path).endswith(".pkl")


def load_blobs(path: str | epath.PathLike) -> dict[str, np.ndarray]:
    """The blobs (name -> array) of the Detectron pickle at ``path`` (which may be a bucket, ``gs://...``).

    Raises:
      safe_pickle.UnsafePickleError: the file names code to run (nothing of it is run).
      ValueError: the file is not a Detectron pickle of arrays with a ``conv1_w`` blob.
    """
    data = safe_pickle.load(path)
    blobs = data.get("blobs", data) if isinstance(data, Mapping) else None
    if not isinstance(blobs, Mapping) or "conv1_w" not in blobs:
        raise errors.WeightsFileError(f"{str(path)!r} is not a Detectron Caffe2 ResNet pickle: expected a dict of "
                                      "blobs (under 'blobs' or at the top) with a 'conv1_w'")
    return {str(name): np.asarray(value) for name, value in blobs.items()}


def _module_path(module: str) -> tuple[tuple[str, ...], bool] | None:
    """``res3_0_branch2a`` -> ``(("layer2_0", "conv1"), False)``; ``..._bn`` names the norm (True); None
    for a name outside the backbone."""
    if module in _STEM:
        return _STEM[module], module.endswith("_bn")
    match = _BLOCK.match(module)
    if not match:
        return None
    stage, index, branch, bn = match.groups()
    return (f"layer{int(stage) - 1}_{int(index)}", _BRANCHES[branch][bool(bn)]), bool(bn)


def blob_name(path: tuple[str, ...]) -> str:
    """The blob that fills the backbone variable at ``path`` (``("layer2_0", "bn1", "scale")`` ->
    ``res3_0_branch2a_bn_s``); statistics, which Detectron's files lack, come with the scale."""
    *module, leaf = path
    if len(module) == 1:
        prefix = {"conv1": "conv1", "bn1": "res_conv1_bn"}[module[0]]
    else:
        block, layer = module
        stage, index = block.removeprefix("layer").split("_")
        branch = next(name for name, layers in _BRANCHES.items() if layer in layers)
        prefix = f"res{int(stage) + 1}_{index}_branch{branch}" + ("_bn" if "bn" in layer else "")
    return prefix + {"kernel": "_w", "bias": "_b"}.get(leaf, "_s")


def convert_caffe2(
    blobs: Mapping[str, np.ndarray], backbone_variables: Mapping[str, Any], norm: str
) -> dict[str, dict]:
    """Detectron Caffe2 ResNet/ResNeXt blobs -> the backbone's variable collections.

    Each ``AffineChannel`` becomes a BatchNorm with mean 0 and variance ``1 - epsilon``: the backbone's
    norm divides by ``sqrt(var + epsilon)``, so this leaves ``x * s + b`` exactly, as the official
    ``FrozenBatchNorm2d`` (no epsilon, variance 1) computes it.

    Args:
      blobs: Caffe2 names to arrays (convolutions OIHW, grouped ones ``[O, I / groups, kh, kw]``).
      backbone_variables, norm: as for ``torchvision_import.convert_resnet``.

    Returns:
      The backbone's collections filled with the pretrained values.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped blob.
    """
    arrays, problems = [], []
    variance = np.float32(1.0) - np.float32(FrozenBatchNorm.epsilon)
    for name, value in blobs.items():
        if _IGNORED.match(name):
            continue
        module, _, field = name.rpartition("_")
        located = _module_path(module)
        if field == "b" and located is not None and not located[1]:
            continue  # a convolution's bias (the MSRA conv1_b): the official loader drops it as well
        if located is None or field not in ("w", "s", "b") or located[1] == (field == "w"):
            problems.append(f"unexpected {name}")
            continue
        path, _ = located
        if field == "w":
            arrays.append((name, path, "kernel", np.transpose(value, (2, 3, 1, 0))))
            continue
        arrays.append((name, path, {"s": "scale", "b": "bias"}[field], value))
        if field == "s":
            arrays.append((name, path, "mean", np.zeros_like(value, np.float32)))
            arrays.append((name, path, "var", np.full_like(value, variance, np.float32)))
    return fill_backbone(arrays, backbone_variables, norm, problems, source_of=blob_name)
