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

``rpn.anchor_generator.cell_anchors.*`` are anchor buffers, not weights. The DCN models (DFConv2d layers) are not
imported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import ml_collections
import numpy as np

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


def source_of(path: Path) -> Source:
    """The official key (without ``module.``) and transform of our variable ``path``."""
    _, part, *module, leaf = path
    if part == "backbone":
        key, transform = resnet_source(tuple(module), leaf, stem="stem.")
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
            return _conv(f"{prefix}.{3 * int(index)}", leaf)
    raise KeyError("/".join(path))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
    """Official ATSS ``state_dict`` (names to arrays, ``module.`` prefixed or not) -> the variables of
    ``config``'s detector (an ``:official`` config for the official outputs).

    Raises:
      ValueError: a DCN config, or naming every missing, unused or mis-shaped key.
    """
    if config.model.backbone.deformable_stages or config.model.head.deformable_tower:
        raise ValueError("Importing the official DCN models (DFConv2d layers) is not supported: use a config "
                         "without model.backbone.deformable_stages and model.head.deformable_tower.")
    if state_dict and all(key.startswith(DDP_PREFIX) for key in state_dict):
        state_dict = {key.removeprefix(DDP_PREFIX): value for key, value in state_dict.items()}
    return fill_variables(abstract_detector_variables(config), state_dict, source_of, _IGNORED, FORMAT)
