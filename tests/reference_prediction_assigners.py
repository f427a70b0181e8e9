"""Per-image numpy designs of the prediction-aware assigners that mmdetection 3.3.0 has no assigner class for.

The tests' references (``tests/test_ota.py``, ``tests/test_paa.py``) loop over boxes *and* anchors, written from the
rules; these follow how the official PyTorch codes run, one image at a time, so that ``scripts/benchmark_assign.py``
can time our jitted, batched versions against them:

  * :func:`ota_per_image` - the official OTA code (Megvii-BaseDetection/OTA, ``ota.py``'s ``get_ground_truth`` and
    ``sinkhorn.py``): per image, the ``[G + 1, A]`` cost matrix of the boxes and the background over all anchors,
    vectorised over boxes and anchors, then a loop of log-domain Sinkhorn steps on it;
  * :func:`paa_per_image` - mmdetection's ``PAAHead`` (``get_targets``' MaxIoUAssigner, ``get_pos_loss``,
    ``paa_reassign``): the initial max-IoU assignment and the initial positives' scores vectorised per image, then
    a Python loop over the boxes, each with its per-level top-k and its own two-Gaussian EM
    (:func:`em_two_gaussians`, in place of sklearn's ``GaussianMixture``, which is not installed here).

Both take the settings of ``configs/base.py``'s assigner section and one image's real boxes (no padding), float32
as the official codes, and return ``gt_index [A]`` (-1 negative), which must be what ``atss_jax.assigners`` gives.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

F32 = np.float32
_EPS = 1e-9  # atss_jax.boxes' guard of divisions by an area
_MASS_EPS = 1e-8  # Sinkhorn's log(mass + 1e-8), as the official code


def _iou_giou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and GIoU of matching boxes ``a [..., 4], b [..., 4]`` (broadcast), the formulas of ``atss_jax.boxes``."""
    wh = np.maximum(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), F32(0))
    intersection = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.maximum(a[..., 2:] - a[..., :2], F32(0)), axis=-1)
    area_b = np.prod(np.maximum(b[..., 2:] - b[..., :2], F32(0)), axis=-1)
    union = area_a + area_b - intersection
    iou = intersection / np.maximum(union, F32(_EPS))
    hull_wh = np.maximum(np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2]), F32(0))
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou, iou - (hull - union) / np.maximum(hull, F32(_EPS))


def _focal_terms(scores: np.ndarray, alpha: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sigmoid focal loss of probabilities ``[..., C]`` against target 1 and against target 0 (logs
    clamped at -100, as torch's BCE and ``atss_jax.assigners.result.focal_loss_sum``)."""
    positive = F32(alpha) * (F32(1) - scores) ** F32(gamma) * -np.maximum(np.log(scores), F32(-100))
    background = F32(1) - scores
    negative = F32(1 - alpha) * (F32(1) - background) ** F32(gamma) * -np.maximum(np.log(background), F32(-100))
    return positive, negative


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """torch.logsumexp's way: the maximum taken out first."""
    top = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def ota_per_image(anchors: np.ndarray, anchor_strides: np.ndarray, anchor_valid: np.ndarray, gt_boxes: np.ndarray,
                  gt_labels: np.ndarray, scores: np.ndarray, pred_boxes: np.ndarray, *, center_radius: float,
                  candidate_topk: int, iou_weight: float, epsilon: float, iterations: int, focal_alpha: float,
                  focal_gamma: float) -> np.ndarray:
    """OTA of one image, the official code's design: the ``[G + 1, A]`` cost matrix then Sinkhorn on it.

    Args:
      anchors: ``[A, 4]``; anchor_strides: ``[A]``; anchor_valid: ``[A]`` bool (invalid anchors demand nothing).
      gt_boxes: ``[G, 4]`` the image's boxes; gt_labels: ``[G]``.
      scores: ``[A, C]`` probabilities; pred_boxes: ``[A, 4]`` decoded.
      The rest: ``configs/base.py``'s ``ota_*`` and ``cost_focal_*`` settings.

    Returns:
      ``gt_index [A]``, -1 for negatives.

    The official code sums the focal loss over a ``[G, A, C]`` tensor of one-hot targets; here the same sum is the
    background's (target 0 everywhere) with the label's term swapped, which saves that tensor (717 MB a temporary at
    100 boxes, 22400 anchors and 80 classes) and only makes this reference faster.
    """
    anchors, scores, pred_boxes, gt_boxes = (np.asarray(x, F32) for x in (anchors, scores, pred_boxes, gt_boxes))
    num_boxes = len(gt_boxes)
    centers = (anchors[:, :2] + anchors[:, 2:]) * F32(0.5)
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) * F32(0.5)
    # The centre prior: inside the box and within center_radius strides of its centre.
    offset = np.abs(centers[None, :, :] - gt_centers[:, None, :])  # [G, A, 2]
    near_center = np.maximum(offset[..., 0], offset[..., 1]) < F32(center_radius) * np.asarray(anchor_strides, F32)
    margin = np.minimum(np.minimum(centers[:, 0] - gt_boxes[:, 0:1], centers[:, 1] - gt_boxes[:, 1:2]),
                        np.minimum(gt_boxes[:, 2:3] - centers[:, 0], gt_boxes[:, 3:4] - centers[:, 1]))
    candidate = near_center & (margin > 0) & anchor_valid[None, :]

    iou, giou = _iou_giou(gt_boxes[:, None, :], pred_boxes[None, :, :])  # [G, A]
    positive, negative = _focal_terms(scores, focal_alpha, focal_gamma)  # [A, C]
    background = negative.sum(axis=1)  # [A]
    foreground = background[None, :] + (positive - negative)[:, gt_labels].T  # [G, A]
    cost = foreground + F32(iou_weight) * (F32(1) - giou) + np.where(candidate, F32(0), F32(1e6))
    cost = np.concatenate([cost, background[None, :]], axis=0)  # [G + 1, A]

    # Dynamic k: the sum of each box's candidate_topk largest candidate IoUs, at least 1.
    candidate_iou = np.where(candidate, iou, F32(0))
    k = min(candidate_topk, candidate_iou.shape[1])
    top_iou = -np.sort(-np.partition(candidate_iou, candidate_iou.shape[1] - k, axis=1)[:, -k:], axis=1)
    dynamic_k = np.maximum(np.floor(top_iou.sum(axis=1)), F32(1))
    demand = anchor_valid.astype(F32)
    supply = np.concatenate([dynamic_k, [demand.sum() - dynamic_k.sum()]]).astype(F32)

    log_supply, log_demand = np.log(supply + F32(_MASS_EPS)), np.log(demand + F32(_MASS_EPS))
    u, v = np.zeros_like(supply), np.zeros_like(demand)
    for _ in range(iterations):
        v = F32(epsilon) * (log_demand - _logsumexp((-cost + u[:, None] + v[None, :]) / F32(epsilon), 0)) + v
        u = F32(epsilon) * (log_supply - _logsumexp((-cost + u[:, None] + v[None, :]) / F32(epsilon), 1)) + u
    plan = np.exp((-cost + u[:, None] + v[None, :]) / F32(epsilon))
    winner = np.argmax(plan / plan.max(axis=1, keepdims=True), axis=0)
    return np.where((winner < num_boxes) & anchor_valid, winner, -1)


def em_two_gaussians(x: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """(component, log-likelihood) per sample of ``x [K]`` under a two-Gaussian 1-D mixture fitted by ``iterations``
    float64 EM steps from sklearn's start as mmdetection's PAAHead gives it (means the lowest and highest sample,
    variances 1, weights 1/2; variances regularised by 1e-6): sklearn's ``fit``, ``predict``, ``score_samples``."""
    x = np.asarray(x, np.float64)
    mean, variance, weight = np.array([x.min(), x.max()]), np.ones(2), np.full(2, 0.5)

    def log_prob():
        return np.log(weight) - 0.5 * (np.log(2 * np.pi * variance) + (x[:, None] - mean) ** 2 / variance)

    for _ in range(iterations):
        lp = log_prob()
        resp = np.exp(lp - np.logaddexp(lp[:, 0], lp[:, 1])[:, None])
        count = resp.sum(0) + 10 * np.finfo(np.float64).eps
        mean = (resp * x[:, None]).sum(0) / count
        variance = (resp * (x[:, None] - mean) ** 2).sum(0) / count + 1e-6
        weight = count / len(x)
    lp = log_prob()
    return lp.argmax(1), np.logaddexp(lp[:, 0], lp[:, 1])


def paa_per_image(anchors: np.ndarray, level_sizes: Sequence[int], anchor_valid: np.ndarray, gt_boxes: np.ndarray,
                  gt_labels: np.ndarray, scores: np.ndarray, pred_boxes: np.ndarray, *, topk: int, box_weight: float,
                  em_iterations: int, focal_alpha: float, focal_gamma: float) -> np.ndarray:
    """PAA of one image, mmdetection's PAAHead design: the initial assignment and scores vectorised, then a loop
    over the boxes, each with its own EM (``paa_reassign``).

    Args:
      anchors: ``[A, 4]``, level by level (``level_sizes``); anchor_valid: ``[A]`` bool.
      gt_boxes: ``[G, 4]`` the image's boxes; gt_labels: ``[G]``.
      scores: ``[A, C]`` probabilities; pred_boxes: ``[A, 4]`` decoded.
      The rest: ``configs/base.py``'s ``paa_*`` and ``cost_focal_*`` settings.

    Returns:
      ``gt_index [A]``, -1 for negatives.

    As ours (and unlike mmdetection's MaxIoUAssigner, where the last box wins), an anchor that reaches a box's best
    IoU goes to its own best box (Detectron2's rule); the EM runs a fixed ``em_iterations`` steps where sklearn stops
    at its tolerance (1e-3) or 100 steps.
    """
    anchors, scores, pred_boxes, gt_boxes = (np.asarray(x, F32) for x in (anchors, scores, pred_boxes, gt_boxes))
    num_anchors = len(anchors)
    # MaxIoUAssigner(pos_iou_thr=0.1, neg_iou_thr=0.1, min_pos_iou=0) on the valid anchors.
    iou = np.where(anchor_valid[None, :], _iou_giou(gt_boxes[:, None, :], anchors[None, :, :])[0], F32(-1))  # [G, A]
    best_iou, best_box = iou.max(axis=0), iou.argmax(axis=0)
    initial = np.where(best_iou >= F32(0.1), best_box, -1)
    box_best = iou.max(axis=1, keepdims=True)
    reaches_box_best = (iou == box_best) & (box_best > 0) & anchor_valid[None, :]
    initial = np.where(reaches_box_best.any(axis=0) & anchor_valid, best_box, initial)

    # get_pos_loss: focal + box_weight * GIoU loss of each initial positive.
    pos_inds = np.flatnonzero(initial >= 0)
    pos_gt_inds = initial[pos_inds]
    positive, negative = _focal_terms(scores[pos_inds], focal_alpha, focal_gamma)  # [P, C]
    one_hot = gt_labels[pos_gt_inds][:, None] == np.arange(scores.shape[1])
    cls_loss = np.where(one_hot, positive, negative).sum(axis=1)
    giou = _iou_giou(pred_boxes[pos_inds], gt_boxes[pos_gt_inds])[1]
    pos_losses = cls_loss + F32(box_weight) * (F32(1) - giou)

    # paa_reassign: per box, its topk lowest-loss initial positives of each level, then its own EM.
    bounds = np.cumsum([0, *level_sizes])
    pos_level_mask = [(pos_inds >= start) & (pos_inds < stop) for start, stop in itertools.pairwise(bounds)]
    gt_index = np.full(num_anchors, -1)
    for gt_ind in range(len(gt_boxes)):
        gt_mask = pos_gt_inds == gt_ind
        inds_gmm, loss_gmm = [], []
        for level_mask in pos_level_mask:
            level_gt_mask = level_mask & gt_mask
            losses = pos_losses[level_gt_mask]
            order = np.argsort(losses, kind="stable")[:topk]
            inds_gmm.append(pos_inds[level_gt_mask][order])
            loss_gmm.append(losses[order])
        inds_gmm, loss_gmm = np.concatenate(inds_gmm), np.concatenate(loss_gmm)
        if len(inds_gmm) < 2:  # the EM needs two samples
            continue
        order = np.argsort(loss_gmm, kind="stable")
        inds_gmm, loss_gmm = inds_gmm[order], loss_gmm[order]
        component, log_likelihood = em_two_gaussians(loss_gmm, em_iterations)
        # gmm_separation_scheme, Fig. 3 (c): the foreground up to its sample of highest likelihood.
        foreground = component == 0
        if foreground.any():
            gt_index[inds_gmm[foreground][: np.argmax(log_likelihood[foreground]) + 1]] = gt_ind
    return gt_index
