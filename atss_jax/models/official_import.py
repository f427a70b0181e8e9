"""The official ATSS checkpoints (sfzhang15/ATSS on maskrcnn-benchmark, e.g. ATSS_R_50_FPN_1x.pth) as this
project's detector variables.

    config = configs.atss_r50_fpn_1x_coco.get_config("official")   # BGR, Detectron's means, std 1
    variables = official_import.convert_state_dict(state_dict, config)

The official model is this project's default one (anchor centres at ``(x + 0.5) * stride``: its inclusive-pixel
anchors and "+1" coder give the same boxes one pixel apart, P7 from ReLU(P6), its decoding and scoring), with the
official input (``base.with_official_recipe``: the ``:official`` variants). Names, as the official modules
register them (``atss_core/modeling``: backbone/resnet.py, backbone/fpn.py, rpn/atss/atss.py), with the
``module.`` of a DistributedDataParallel save or without:

  backbone.body.stem.{conv1,bn1}, backbone.body.layer{s}.{i}.{conv,bn}{j},
  backbone.body.layer{s}.{i}.downsample.{0,1}                     -> backbone/... (FrozenBatchNorm2d: no epsilon)
  backbone.fpn.fpn_inner{2,3,4}, fpn_layer{2,3,4}, top_blocks.{p6,p7} -> fpn/lateral{3,4,5}, output{3,4,5}, p6, p7
  rpn.head.{cls,bbox}_tower.{3i}, .{3i+1}                          -> head/{cls,box}_conv{i}, _norm{i} (GroupNorm)
  rpn.head.cls_logits, bbox_pred, centerness, scales.{l}.scale     -> head/cls_logits, bbox_pred, centerness, scale{l}

``rpn.anchor_generator.cell_anchors.*`` are anchor buffers, not weights. In the DCN models a deformable 3x3 conv
(``DFConv2d``: a backbone block's ``conv2`` in the ``STAGE_WITH_DCN`` stages, each tower's last conv) holds its
kernel as ``<conv>.conv.{weight,bias}`` and its offset/mask conv as ``<conv>.offset.{weight,bias}``, whose 27
channels are laid out as ours (``deform_conv``: 9 ``(dy, dx)`` pairs, then 9 masks), so only kernels transpose.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import ml_collections
import numpy as np
from flax import traverse_util

from atss_jax import errors
from atss_jax.models.layers import FrozenBatchNorm
from atss_jax.models.state_dict_import import (
    NORM_FIELDS,
    Path,
    Source,
    abstract_detector_variables,
    conv_kernel,
    fill_variables,
    resnet_source,
    scalar,
)

FORMAT = "official ATSS"
DDP_PREFIX = "module."
_IGNORED = re.compile(r"^rpn\.anchor_generator\.|num_batches_tracked$")
_FPN = {"lateral3": "fpn_inner2", "lateral4": "fpn_inner3", "lateral5": "fpn_inner4", "output3": "fpn_layer2",
        "output4": "fpn_layer3", "output5": "fpn_layer4", "p6": "top_blocks.p6", "p7": "top_blocks.p7"}
_TOWER = re.compile(r"^(cls|box)_(conv|norm)(\d+)$")


def _frozen_variance(value: np.ndarray) -> np.ndarray:
    """The official FrozenBatchNorm2d divides by sqrt(var), ours by sqrt(var + epsilon): the same numbers."""
    return np.asarray(value, np.float32) - np.float32(FrozenBatchNorm.epsilon)


def _conv(name: str, leaf: str) -> Source:
    return Source(f"{name}.weight", conv_kernel) if leaf == "kernel" else Source(f"{name}.{leaf}")


def _deformable(name: str, module: list[str], deformable: frozenset[Path]) -> str:
    """``name`` of a conv inside the official ``DFConv2d`` when ``module`` is deformable (its kernel: ``.conv``)
    or its offset/mask conv (``.offset``)."""
    if module[-1] == "conv_offset":
        return f"{name}.offset"
    return f"{name}.conv" if tuple(module) in deformable else name


def source_of(path: Path, deformable: frozenset[Path] = frozenset()) -> Source:
    """The official key (without ``module.``) and transform of our variable ``path``; ``deformable``: the module
    paths (after the part, e.g. ``("layer3_0", "conv2")``) that are deformable convolutions."""
    _, part, *module, leaf = path
    if part == "backbone":
        convolution = [m for m in module if m != "conv_offset"]
        key, transform = resnet_source(tuple(convolution), leaf, stem="stem.")
        if leaf in ("kernel", "bias") and module[-1] in ("conv2", "conv_offset"):
            name = key.rsplit(".", 1)[0]
            key = f"{_deformable(name, module, deformable)}.{key.rsplit('.', 1)[1]}"
            transform = conv_kernel if leaf == "kernel" else np.asarray
        return Source(f"backbone.body.{key}", _frozen_variance if leaf == "var" else transform)
    if part == "fpn":
        return _conv(f"backbone.fpn.{_FPN[module[0]]}", leaf)
    if part == "head":
        name = module[0]
        if name.startswith("scale"):
            return Source(f"rpn.head.scales.{name.removeprefix('scale')}.scale", scalar)
        if name in ("cls_logits", "bbox_pred", "centerness"):
            return _conv(f"rpn.head.{name}", leaf)
        match = _TOWER.match(name)
        if match:
            tower, layer, index = match.groups()
            prefix = f"rpn.head.{'cls' if tower == 'cls' else 'bbox'}_tower"
            if layer == "norm":
                return Source(f"{prefix}.{3 * int(index) + 1}.{NORM_FIELDS[leaf]}")
            return _conv(_deformable(f"{prefix}.{3 * int(index)}", module, deformable), leaf)
    raise KeyError("/".join(path))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
    """Official ATSS ``state_dict`` (names to arrays, ``module.`` prefixed or not) -> the variables of
    ``config``'s detector (an ``:official`` config for the official outputs).

    Raises:
      ValueError: a DCN checkpoint for a config without DCN or the reverse, or naming every missing, unused or
        mis-shaped key.
    """
    if state_dict and all(key.startswith(DDP_PREFIX) for key in state_dict):
        state_dict = {key.removeprefix(DDP_PREFIX): value for key, value in state_dict.items()}
    abstract = abstract_detector_variables(config)
    deformable = frozenset(path[2:-2] for path in traverse_util.flatten_dict(abstract) if path[-2] == "conv_offset")
    checkpoint_dcn = any(key.endswith(".offset.weight") for key in state_dict)
    if checkpoint_dcn != bool(deformable):
        raise errors.WeightsFileError(
            "The checkpoint has deformable convolutions (DFConv2d) but the config none: use the model's dcnv2 "
            "config (e.g. configs/atss_r50_dcnv2_fpn_1x_coco.py:official)." if checkpoint_dcn else
            "The config has deformable convolutions but the checkpoint none: use the model's config without dcnv2 "
            "(e.g. configs/atss_r50_fpn_1x_coco.py:official).")
    return fill_variables(abstract, state_dict, functools.partial(source_of, deformable=deformable), _IGNORED,
                          FORMAT)

