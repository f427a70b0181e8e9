"""The inference step shared by evaluation and serving: images in, detections in original pixels out."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from atss_jax import boxes as box_lib
from atss_jax import postprocess
from atss_jax.anchors import anchor_valid_mask, build_anchor_grid


def eval_step(variables: dict, batch: dict[str, jax.Array], *, config: ml_collections.ConfigDict,
              model: nn.Module) -> dict[str, jax.Array]:
    """Detections of one device's images (a pure function: jit it, or map it over devices with shard_map).

    Args:
      variables: the model's variables (``params`` and the norm statistics).
      batch: ``image [B, H, W, 3] uint8``, ``image_size [B, 2] int32`` (the resized image inside the
        canvas), ``scale [B] float32`` (resized / original).
      config: the experiment config (``anchors``, ``model.head`` and ``eval`` sections are read).
      model: the detector of ``config.model``.

    Returns:
      ``boxes [B, D, 4]`` xyxy original pixels, ``scores [B, D]``, ``classes [B, D]`` (0..C-1) and
      ``valid [B, D]``, best first, D = ``config.eval.max_detections``.
    """
    grid = build_anchor_grid(config.anchors, batch["image"].shape[1:3])
    anchors, strides = jnp.asarray(grid.boxes), jnp.asarray(grid.anchor_strides)
    class_logits, box_regression, centerness_logits = model.apply(variables, batch["image"], batch["image_size"],
                                                                     train=False)
    decoded = box_lib.decode_regression(config.model.head.regression, anchors, strides, box_regression,
                                        config.model.head.box_coder)
    if not config.model.head.use_centerness:
        centerness_logits = jnp.full_like(centerness_logits, jnp.inf)  # sigmoid -> 1: rank by class only
    select = functools.partial(
        postprocess.select_detections, level_sizes=grid.level_sizes, score_threshold=config.eval.score_threshold,
        pre_nms_topk=config.eval.pre_nms_topk, iou_threshold=config.eval.nms_iou_threshold,
        max_detections=config.eval.max_detections, score_rule=config.eval.score_rule)
    detections = jax.vmap(select)(jax.nn.sigmoid(class_logits), jax.nn.sigmoid(centerness_logits), decoded,
                                  anchor_valid_mask(grid.centers, batch["image_size"], config.eval.anchor_pad_divisor),
                                  batch["image_size"],
                                  batch["scale"])
    return detections._asdict()
