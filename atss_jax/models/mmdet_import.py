"""mmdetection's ATSS checkpoints (e.g. ATSS R-50 1x, 39.4 AP) as this project's detector variables.

    config = mmdet_import.config_for_mmdet(base_config)          # or configs/atss_r50_fpn_1x_coco_mmdet.py
    variables = mmdet_import.convert_state_dict(state_dict, config)

mmdetection's model is this project's with a few switches (``config_for_mmdet``), not a fork: anchor
centres at ``x * stride`` (``anchors.center_offset=0``), P7 from P6 without a ReLU
(``model.fpn_relu_before_p7=False``: its FPN's ``add_extra_convs='on_output'``,
``relu_before_extra_convs=False``), its DeltaXYWHBBoxCoder (stds (0.1, 0.1, 0.2, 0.2) = our weights
(10, 10, 5, 5), log-size clamped on both sides: ``model.head.box_coder="mmdetection"``), its test-time
scoring (rank by class probability, score ``prob * centerness``: ``eval.score_rule="mmdetection"``), RGB
with torchvision's mean and std, and its test_cfg (nms_pre 1000, score_thr 0.05, NMS IoU 0.6, 100 per
image) and test resize (short side 800, long side at most 1333), which are our defaults.

Names (``state_dict`` -> ours):
  backbone.{conv1,bn1,layer{s}.{i}.{conv,bn}{j},layer{s}.{i}.downsample.{0,1}}  -> backbone/... (torchvision's)
  neck.lateral_convs.{0,1,2}.conv, neck.fpn_convs.{0,1,2}.conv               -> fpn/lateral{3,4,5}, output{3,4,5}
  neck.fpn_convs.{3,4}.conv                                                  -> fpn/p6, p7
  bbox_head.{cls,reg}_convs.{i}.conv.weight, .gn                             -> head/{cls,box}_conv{i}, _norm{i}
  bbox_head.atss_cls, atss_reg, atss_centerness, scales.{l}.scale            -> head/cls_logits, bbox_pred,
                                                                                centerness, scale{l}
The tower convolutions have no bias in mmdetection (a GroupNorm follows): ours start at zero.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import ml_collections
import numpy as np

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

FORMAT = "mmdetection ATSS"
_IGNORED = re.compile(r"num_batches_tracked$")
_FPN = {"lateral3": "lateral_convs.0", "lateral4": "lateral_convs.1", "lateral5": "lateral_convs.2",
        "output3": "fpn_convs.0", "output4": "fpn_convs.1", "output5": "fpn_convs.2", "p6": "fpn_convs.3",
        "p7": "fpn_convs.4"}
_HEAD_OUT = {"cls_logits": "atss_cls", "bbox_pred": "atss_reg", "centerness": "atss_centerness"}
_TOWER = re.compile(r"^(cls|box)_(conv|norm)(\d+)$")


def config_for_mmdet(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` switched to mmdetection's ATSS model and test-time behaviour (see the module docstring)."""
    config.anchors.center_offset = 0.0
    config.model.fpn_relu_before_p7 = False
    config.model.head.box_coder = "mmdetection"
    config.eval.score_rule = "mmdetection"
    config.eval.anchor_pad_divisor = 32
    config.model.input_channels = "rgb"
    config.model.pixel_mean = (123.675, 116.28, 103.53)
    config.model.pixel_std = (58.395, 57.12, 57.375)
    config.model.backbone.stride_in_1x1 = False  # mmdetection's style="pytorch"
    return config


def source_of(path: Path) -> Source:
    """The mmdetection key (and transform) of our variable ``path`` (``(collection, module..., leaf)``)."""
    _, part, *module, leaf = path
    if part == "backbone":
        key, transform = resnet_source(tuple(module), leaf)
        return Source(f"backbone.{key}", transform)
    if part == "fpn":
        return Source(f"neck.{_FPN[module[0]]}.conv.{'weight' if leaf == 'kernel' else leaf}",
                      conv_kernel if leaf == "kernel" else np.asarray)
    if part == "head":
        name = module[0]
        if name.startswith("scale"):
            return Source(f"bbox_head.scales.{name.removeprefix('scale')}.scale", scalar)
        if name in _HEAD_OUT:
            return Source(f"bbox_head.{_HEAD_OUT[name]}.{'weight' if leaf == 'kernel' else leaf}",
                          conv_kernel if leaf == "kernel" else np.asarray)
        match = _TOWER.match(name)
        if match:
            tower, layer, index = match.groups()
            prefix = f"bbox_head.{'cls' if tower == 'cls' else 'reg'}_convs.{index}"
            if layer == "norm":
                return Source(f"{prefix}.gn.{NORM_FIELDS[leaf]}")
            return Source(f"{prefix}.conv.weight", conv_kernel) if leaf == "kernel" else Source(None)
    raise KeyError("/".join(path))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
    """mmdetection ATSS ``state_dict`` (names to arrays) -> the variables of ``config``'s detector.

    ``config`` should be ``config_for_mmdet``'s (or configs/atss_r50_fpn_1x_coco_mmdet.py) for the outputs to
    be mmdetection's; the conversion itself needs only the architecture (depth, classes, head) to match.

    Returns:
      ``{"params": ..., "frozen": ...}`` (``"batch_stats"`` for ``model.backbone.norm="bn"``), float32 numpy.

    Raises:
      ValueError: naming every missing, unused or mis-shaped key.
    """
    return fill_variables(abstract_detector_variables(config), state_dict, source_of, _IGNORED, FORMAT)
