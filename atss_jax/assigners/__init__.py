"""Assigners: which anchors are positive for which ground-truth box.

Each assigner is a pure function of one image (``atss_assign``, ``max_iou_assign``, ``fcos_assign``)
except the grid-aware ATSS, which takes the batch so that its rare exact fallback is one
``lax.cond``. :func:`build_assigner` binds the configured one to an anchor grid with one batched
signature, ``(anchor_valid [B, A], gt_boxes [B, G, 4], gt_valid [B, G]) -> AssignResult [B, ...]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import ml_collections

from atss_jax.anchors import AnchorGrid
from atss_jax.assigners.atss import atss_assign
from atss_jax.assigners.atss_grid import atss_assign_grid
from atss_jax.assigners.fcos import fcos_assign
from atss_jax.assigners.max_iou import max_iou_assign
from atss_jax.assigners.result import IGNORED, NEGATIVE, AssignResult

__all__ = ["ASSIGNERS", "ATSS_IMPLEMENTATIONS", "IGNORED", "NEGATIVE", "AssignFn", "AssignResult", "build_assigner"]

AssignFn = Callable[[jax.Array, jax.Array, jax.Array], AssignResult]
ASSIGNERS = ("atss", "max_iou", "fcos", "fcos_center_sampling")
ATSS_IMPLEMENTATIONS = ("grid", "full_matrix")


def build_assigner(config: ml_collections.ConfigDict, grid: AnchorGrid) -> AssignFn:
    """Binds the assigner named by ``config.name`` to the anchors of ``grid``.

    Args:
      config: the ``assigner`` section of the experiment config (see ``configs/base.py``).
      grid: the anchors of the canvas.

    Returns:
      ``assign(anchor_valid [B, A], gt_boxes [B, G, 4], gt_valid [B, G]) -> AssignResult`` with a
      leading batch axis on every field.
    """
    if config.name == "atss" and config.atss_implementation not in ATSS_IMPLEMENTATIONS:
        raise ValueError(
            f"config.assigner.atss_implementation={config.atss_implementation!r} is not one of {ATSS_IMPLEMENTATIONS}"
        )
    if config.name == "atss" and config.atss_implementation == "grid":
        return functools.partial(atss_assign_grid, grid, topk=config.topk, center_eps=config.center_eps)
    if config.name == "atss":
        assign = functools.partial(
            atss_assign,
            level_sizes=grid.level_sizes,
            topk=config.topk,
            anchors_per_location=grid.anchors_per_location,
            center_eps=config.center_eps,
        )
    elif config.name == "max_iou":
        assign = functools.partial(
            max_iou_assign,
            pos_iou_thr=config.pos_iou_thr,
            neg_iou_thr=config.neg_iou_thr,
            low_quality_matches=config.low_quality_matches,
            in_gt_box=config.in_gt_box,
            center_eps=config.center_eps,
        )
    elif config.name in ("fcos", "fcos_center_sampling"):
        assign = functools.partial(
            fcos_assign,
            level_sizes=grid.level_sizes,
            level_strides=grid.strides,
            regress_ranges=tuple(tuple(r) for r in config.regress_ranges),
            center_sampling_radius=(config.center_sampling_radius if config.name == "fcos_center_sampling" else None),
        )
    else:
        raise ValueError(f"config.assigner.name={config.name!r} is not one of {ASSIGNERS}")
    return jax.vmap(functools.partial(assign, grid.boxes))
