"""Assigners: which anchors are positive for which ground-truth box.

Each assigner is a pure function of one image (``atss_assign``, ``max_iou_assign``, ``fcos_assign``)
except the grid-aware ATSS, which takes the batch so that its rare exact fallback is one
``lax.cond``. :func:`build_assigner` binds the configured one to an anchor grid with one batched
signature, ``(anchor_valid [B, A], gt_boxes [B, G, 4], gt_valid [B, G]) -> AssignResult [B, ...]``.

The prediction-aware assigners (``PREDICTION_AWARE``: TOOD's task-aligned ``tal``, YOLOX's ``simota``, ``ota``, ``paa``)
also
read the model's gradient-stopped predictions and return a soft target per anchor beside the assignment:
``(anchor_valid, gt_boxes, gt_valid, gt_labels [B, G], Predictions, step) -> SoftAssignment``; ``step`` (the
train step, a traced scalar) switches to ATSS before ``config.warmup_assigner_steps`` without recompiling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from atss_jax.anchors import AnchorGrid
from atss_jax.assigners.atss import atss_assign
from atss_jax.assigners.atss_grid import atss_assign_grid
from atss_jax.assigners.fcos import fcos_assign
from atss_jax.assigners.max_iou import max_iou_assign
from atss_jax.assigners.ota import ota_assign
from atss_jax.assigners.paa import paa_assign
from atss_jax.assigners.result import IGNORED, NEGATIVE, AssignResult, matched_iou
from atss_jax.assigners.simota import simota_assign
from atss_jax.assigners.tal import tal_assign

__all__ = [
    "ASSIGNERS", "ATSS_IMPLEMENTATIONS", "IGNORED", "NEGATIVE", "PREDICTION_AWARE", "AssignFn", "AssignResult",
    "PredictionAssignFn", "Predictions", "SoftAssignment", "build_assigner", "is_prediction_aware",
]

AssignFn = Callable[[jax.Array, jax.Array, jax.Array], AssignResult]
PREDICTION_AWARE = ("tal", "simota", "ota", "paa")
ASSIGNERS = ("atss", "max_iou", "fcos", "fcos_center_sampling", *PREDICTION_AWARE)
ATSS_IMPLEMENTATIONS = ("grid", "full_matrix")


class Predictions(NamedTuple):
    """The model's predictions a prediction-aware assigner reads (gradient stopped by the caller).

    Attributes:
      scores: ``[B, A, C]`` float32 class probabilities (sigmoid of the logits).
      boxes: ``[B, A, 4]`` float32 decoded boxes, xyxy pixels.
    """

    scores: jax.Array
    boxes: jax.Array


class SoftAssignment(NamedTuple):
    """A prediction-aware assignment: the hard one and ``quality [B, A]`` float32 soft targets in [0, 1] (0 off
    positives), the classification target of the quality losses."""

    result: AssignResult
    quality: jax.Array


PredictionAssignFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Predictions, jax.Array], SoftAssignment]


def is_prediction_aware(config: ml_collections.ConfigDict) -> bool:
    """Whether the assigner of the ``assigner`` config section reads the predictions."""
    return config.name in PREDICTION_AWARE


def build_assigner(config: ml_collections.ConfigDict, grid: AnchorGrid) -> AssignFn | PredictionAssignFn:
    """Binds the assigner named by ``config.name`` to the anchors of ``grid``.

    Args:
      config: the ``assigner`` section of the experiment config (see ``configs/base.py``).
      grid: the anchors of the canvas.

    Returns:
      ``assign(anchor_valid [B, A], gt_boxes [B, G, 4], gt_valid [B, G]) -> AssignResult`` with a
      leading batch axis on every field; for a prediction-aware assigner (``is_prediction_aware``)
      ``assign(anchor_valid, gt_boxes, gt_valid, gt_labels [B, G], predictions, step) -> SoftAssignment``.
    """
    if config.name in PREDICTION_AWARE:
        return _build_prediction_aware(config, grid)
    return _build_prior_based(config.name, config, grid)


def _build_prediction_aware(config: ml_collections.ConfigDict, grid: AnchorGrid) -> PredictionAssignFn:
    if config.name == "tal":
        assign_image = functools.partial(
            tal_assign, grid.boxes, topk=config.tal_topk, alpha=config.tal_alpha, beta=config.tal_beta,
            center_eps=config.center_eps)
    elif config.name == "ota":
        assign_image = functools.partial(
            ota_assign, grid.boxes, grid.anchor_strides, center_radius=config.ota_center_radius,
            candidate_topk=config.ota_candidate_topk, iou_weight=config.ota_iou_weight, epsilon=config.ota_epsilon,
            iterations=config.ota_iterations, focal_alpha=config.cost_focal_alpha, focal_gamma=config.cost_focal_gamma)
    elif config.name == "paa":
        assign_image = functools.partial(
            paa_assign, grid.boxes, level_sizes=grid.level_sizes, topk=config.paa_topk,
            box_weight=config.paa_box_weight, em_iterations=config.paa_em_iterations,
            focal_alpha=config.cost_focal_alpha, focal_gamma=config.cost_focal_gamma)
    else:
        assign_image = functools.partial(
            simota_assign, grid.boxes, grid.anchor_strides, center_radius=config.simota_center_radius,
            candidate_topk=config.simota_candidate_topk, iou_weight=config.simota_iou_weight,
            cls_weight=config.simota_cls_weight)
    aware = jax.vmap(assign_image)
    warmup = _build_prior_based("atss", config, grid)

    def assign(anchor_valid, gt_boxes, gt_valid, gt_labels, predictions, step):
        def aligned():
            return SoftAssignment(*aware(anchor_valid, gt_boxes, gt_valid, gt_labels, predictions.scores,
                                         predictions.boxes))

        def prior_based():
            result = warmup(anchor_valid, gt_boxes, gt_valid)
            return SoftAssignment(result, jax.vmap(matched_iou)(predictions.boxes, gt_boxes, result.gt_index))

        if config.warmup_assigner_steps <= 0:
            return aligned()
        # A traced step: both branches are compiled once, lax.cond runs one.
        return jax.lax.cond(jnp.asarray(step) < config.warmup_assigner_steps, prior_based, aligned)

    return assign


def _build_prior_based(name: str, config: ml_collections.ConfigDict, grid: AnchorGrid) -> AssignFn:
    """The assigner ``name`` (not prediction-aware), its settings read from ``config``."""
    if name == "atss" and config.atss_implementation not in ATSS_IMPLEMENTATIONS:
        raise ValueError(
            f"config.assigner.atss_implementation={config.atss_implementation!r} is not one of {ATSS_IMPLEMENTATIONS}"
        )
    if name == "atss" and config.atss_implementation == "grid":
        return functools.partial(atss_assign_grid, grid, topk=config.topk, center_eps=config.center_eps)
    if name == "atss":
        assign = functools.partial(
            atss_assign,
            level_sizes=grid.level_sizes,
            topk=config.topk,
            anchors_per_location=grid.anchors_per_location,
            center_eps=config.center_eps,
        )
    elif name == "max_iou":
        assign = functools.partial(
            max_iou_assign,
            pos_iou_thr=config.pos_iou_thr,
            neg_iou_thr=config.neg_iou_thr,
            low_quality_matches=config.low_quality_matches,
            in_gt_box=config.in_gt_box,
            center_eps=config.center_eps,
        )
    elif name in ("fcos", "fcos_center_sampling"):
        assign = functools.partial(
            fcos_assign,
            level_sizes=grid.level_sizes,
            level_strides=grid.strides,
            regress_ranges=tuple(tuple(r) for r in config.regress_ranges),
            center_sampling_radius=(config.center_sampling_radius if name == "fcos_center_sampling" else None),
        )
    else:
        raise ValueError(f"config.assigner.name={config.name!r} is not one of {ASSIGNERS}")
    return jax.vmap(functools.partial(assign, grid.boxes))
