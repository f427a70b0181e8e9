"""mmdetection 3.3.0 as a peer: its real ATSS model, importable next to mmcv-lite on a CPU.

Test and benchmark use only (requirements-test.txt), never a runtime dependency. Two obstacles, both
outside the code paths the CPU comparison runs:
- mmdetection 3.3.0 asserts mmcv < 2.2.0 at import, and 2.2.0 is the only mmcv-lite on PyPI: the check
  is passed by reporting 2.1.0 for the duration of the import (the Python API mmdetection uses did not
  change between the two).
- mmcv-lite ships `mmcv.ops` without its compiled `mmcv._ext`: the ops are loaded through a stand-in
  extension whose `nms` is a pure-PyTorch greedy NMS (torchvision's CUDA kernel for CUDA tensors, where
  torchvision is installed; post-processing needs it) and whose other functions raise, naming the op, if
  anything ever calls them (ATSS R-50 on a CPU does not). On a GPU, mmdetection's FocalLoss would call
  mmcv's CUDA focal-loss kernel: it is given mmdetection's own pure-PyTorch focal loss instead (what its
  CPU path runs; the same values), so a GPU timing of this peer is slower than full mmcv by that kernel's
  advantage on the classification loss.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import sys
import types
from typing import Any

MMDET_VERSION = "3.3.0"


def _greedy_nms(boxes, scores, iou_threshold: float, offset: int = 0):
    """mmcv's `nms` kernel contract: indices of kept boxes, by decreasing score.

    boxes: [N, 4] xyxy, scores: [N].
    """
    import torch

    if boxes.is_cuda and offset == 0:
        with contextlib.suppress(ImportError):
            import torchvision

            return torchvision.ops.nms(boxes, scores, float(iou_threshold))
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order]
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2[i + 1:]) - torch.maximum(x1[i], x1[i + 1:]) + offset).clamp(min=0)
        h = (torch.minimum(y2[i], y2[i + 1:]) - torch.maximum(y1[i], y1[i + 1:]) + offset).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[i + 1:] - inter)
        suppressed[i + 1:] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def _pure_torch_sigmoid_focal_loss(pred, target, weight=None, gamma=2.0, alpha=0.25, reduction="mean",
                                   avg_factor=None):
    """mmdetection's `sigmoid_focal_loss` contract (labels [N], background = C) through its pure-PyTorch
    `py_sigmoid_focal_loss` on one-hot targets, as its FocalLoss does for CPU tensors."""
    from mmdet.models.losses import focal_loss
    from torch.nn import functional

    num_classes = pred.size(1)
    one_hot = functional.one_hot(target, num_classes=num_classes + 1)[:, :num_classes].type_as(pred)
    return focal_loss.py_sigmoid_focal_loss(pred, one_hot, weight, gamma=gamma, alpha=alpha, reduction=reduction,
                                            avg_factor=avg_factor)


class _StandInExtension(types.ModuleType):
    """`mmcv._ext` for mmcv-lite: pure-PyTorch `nms`; every other kernel raises when called."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(
                f"mmcv-lite has no compiled op '{name}'; the mmdetection peer supports only models whose "
                "CPU path is pure PyTorch (ATSS/RetinaNet/FCOS without DCN)")

        return missing


@contextlib.contextmanager
def _reported_mmcv_version(version: str):
    import mmcv

    real = mmcv.__version__
    mmcv.__version__ = version
    try:
        yield
    finally:
        mmcv.__version__ = real


def import_mmdet() -> types.ModuleType:
    """Imports mmdetection (and registers its modules); idempotent. Raises ImportError with the fix."""
    if "mmdet.models" in sys.modules:
        return sys.modules["mmdet"]
    try:
        import mmcv  # noqa: F401
        import mmengine  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"The mmdetection peer needs the test requirements ({error}): bash scripts/setup.sh --test") from error
    if "mmcv._ext" not in sys.modules:
        extension = _StandInExtension("mmcv._ext")
        extension.nms = _greedy_nms
        # A spec without a loader: mmengine's Runner then sees mmcv-lite (no compiled ops), as it is.
        extension.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
        sys.modules["mmcv._ext"] = extension
    with _reported_mmcv_version("2.1.0"):
        mmdet = importlib.import_module("mmdet")
    if mmdet.__version__ != MMDET_VERSION:
        raise ImportError(f"The peer is checked against mmdetection {MMDET_VERSION}, found {mmdet.__version__}")
    importlib.import_module("mmdet.models")
    importlib.import_module("mmdet.models.losses.focal_loss").sigmoid_focal_loss = _pure_torch_sigmoid_focal_loss
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    return mmdet


def atss_r50_config(num_classes: int = 80, *, pretrained_backbone: bool = False) -> dict:
    """mmdetection's `atss_r50_fpn_1x_coco` model dict (configs/atss/), without loading config files.

    With `pretrained_backbone=False` the backbone starts from random weights (no download).
    """
    backbone = dict(
        type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
        norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, style="pytorch")
    if pretrained_backbone:
        backbone["init_cfg"] = dict(type="Pretrained", checkpoint="torchvision://resnet50")
    return dict(
        type="ATSS",
        data_preprocessor=dict(
            type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True, pad_size_divisor=32),
        backbone=backbone,
        neck=dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=256, start_level=1,
                  add_extra_convs="on_output", num_outs=5),
        bbox_head=dict(
            type="ATSSHead", num_classes=num_classes, in_channels=256, stacked_convs=4, feat_channels=256,
            anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8,
                                  scales_per_octave=1, strides=[8, 16, 32, 64, 128]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0],
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
            loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1,
                       debug=False),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.6),
                      max_per_img=100))


def build_model(model_config: dict):
    """An mmdetection model (torch.nn.Module, weights initialised as mmdetection does) from a model dict."""
    import_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    from mmengine.logging import MMLogger

    model = MODELS.build(ConfigDict(model_config))  # its heads read train_cfg/test_cfg as attributes
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel("WARNING")  # init_weights logs every parameter
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model
