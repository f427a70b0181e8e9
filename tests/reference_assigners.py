"""Independent references for the assigners: one box at a time, plain loops, written from the rules.

They share no code with ``atss_jax.assigners`` (only numpy), so agreement is evidence that the
vectorised versions implement the rules. Arithmetic is float32 in the same formulas (squared
centre distances, IoU = intersection / union) so that exact ties stay exact ties.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def _iou(a: np.ndarray, b: np.ndarray) -> np.float32:
    iw = max(F32(0), min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(F32(0), min(a[3], b[3]) - max(a[1], b[1]))
    inter = F32(iw * ih)
    area_a = F32(max(F32(0), a[2] - a[0]) * max(F32(0), a[3] - a[1]))
    area_b = F32(max(F32(0), b[2] - b[0]) * max(F32(0), b[3] - b[1]))
    union = F32(area_a + area_b - inter)
    return F32(inter / max(union, F32(1e-9)))


def _center(box: np.ndarray) -> tuple[np.float32, np.float32]:
    return F32((box[0] + box[2]) * F32(0.5)), F32((box[1] + box[3]) * F32(0.5))


def atss_reference(anchors, anchor_valid, gt_boxes, gt_valid, level_sizes, topk, anchors_per_location, center_eps):
    """Returns (gt_index [A], num_positives [G], iou_threshold [G]) as numpy arrays."""
    anchors = anchors.astype(F32)
    gt_boxes = gt_boxes.astype(F32)
    num_anchors, num_boxes = len(anchors), len(gt_boxes)
    gt_index = np.full(num_anchors, -1, np.int64)
    best_iou = np.full(num_anchors, -np.inf, np.float64)
    thresholds = np.zeros(num_boxes, np.float64)
    for g in range(num_boxes):
        if not gt_valid[g]:
            continue
        gx, gy = _center(gt_boxes[g])
        centers = (anchors[:, :2] + anchors[:, 2:]) * F32(0.5)
        candidates = []
        start = 0
        for size in level_sizes:
            level = np.arange(start, start + size)
            level = level[anchor_valid[level]]
            dx, dy = gx - centers[level, 0], gy - centers[level, 1]
            sq_distance = (dx * dx + dy * dy).astype(F32)
            order = np.lexsort((level, sq_distance))  # by distance, then by anchor index
            candidates += level[order[: topk * anchors_per_location]].tolist()
            start += size
        ious = [float(_iou(anchors[a], gt_boxes[g])) for a in candidates]
        if not ious:
            continue
        std = float(np.std(ious, ddof=1)) if len(ious) > 1 else 0.0
        thresholds[g] = float(np.mean(ious)) + std
        x1, y1, x2, y2 = gt_boxes[g]
        for a, iou in zip(candidates, ious):
            ax, ay = _center(anchors[a])
            inside = min(ax - x1, ay - y1, x2 - ax, y2 - ay) > center_eps
            if iou >= thresholds[g] and inside and iou > best_iou[a]:
                best_iou[a], gt_index[a] = iou, g
    counts = np.array([np.sum(gt_index == g) for g in range(num_boxes)], np.int64)
    return gt_index, counts, thresholds


def max_iou_reference(anchors, anchor_valid, gt_boxes, gt_valid, pos_iou_thr, neg_iou_thr, low_quality_matches,
                      in_gt_box=False, center_eps=0.01):
    """Returns gt_index [A] (-1 negative, -2 ignored)."""
    num_anchors, num_boxes = len(anchors), len(gt_boxes)
    iou = np.full((num_boxes, num_anchors), -1.0)
    for g in range(num_boxes):
        for a in range(num_anchors):
            if gt_valid[g] and anchor_valid[a]:
                iou[g, a] = _iou(anchors[a].astype(F32), gt_boxes[g].astype(F32))
    gt_index = np.full(num_anchors, -1, np.int64)
    best_box = np.zeros(num_anchors, np.int64)
    for a in range(num_anchors):
        if not anchor_valid[a]:
            continue
        best = -1.0
        for g in range(num_boxes):
            if iou[g, a] > best:
                best, best_box[a] = iou[g, a], g
        gt_index[a] = best_box[a] if best >= pos_iou_thr else (-1 if best < neg_iou_thr else -2)
    if low_quality_matches:
        for g in range(num_boxes):
            box_best = iou[g].max() if num_anchors else -1.0
            if not gt_valid[g] or box_best <= 0:
                continue
            for a in range(num_anchors):
                if anchor_valid[a] and iou[g, a] == box_best:
                    gt_index[a] = best_box[a]
    if in_gt_box:
        for a in range(num_anchors):
            if gt_index[a] < 0:
                continue
            ax, ay = _center(anchors[a].astype(F32))
            x1, y1, x2, y2 = gt_boxes[gt_index[a]].astype(F32)
            if not min(ax - x1, ay - y1, x2 - ax, y2 - ay) > center_eps:
                gt_index[a] = -2
    return gt_index


def fcos_reference(anchors, anchor_valid, gt_boxes, gt_valid, level_sizes, level_strides, regress_ranges, radius):
    """Returns gt_index [A]."""
    anchors = anchors.astype(F32)
    gt_boxes = gt_boxes.astype(F32)
    gt_index = np.full(len(anchors), -1, np.int64)
    level_of = np.repeat(np.arange(len(level_sizes)), level_sizes)
    for a in range(len(anchors)):
        if not anchor_valid[a]:
            continue
        px, py = _center(anchors[a])
        stride = F32(level_strides[level_of[a]])
        low, high = regress_ranges[level_of[a]]
        best_area = np.inf
        for g in range(len(gt_boxes)):
            if not gt_valid[g]:
                continue
            x1, y1, x2, y2 = gt_boxes[g]
            if min(px - x1, py - y1, x2 - px, y2 - py) <= 0:
                continue
            if radius is not None:
                cx, cy = _center(gt_boxes[g])
                r = F32(F32(radius) * stride)
                region = (max(cx - r, x1), max(cy - r, y1), min(cx + r, x2), min(cy + r, y2))
                if min(px - region[0], py - region[1], region[2] - px, region[3] - py) <= 0:
                    continue
            reach = max(px - x1, py - y1, x2 - px, y2 - py)
            if not low <= reach <= high:
                continue
            area = F32(F32(x2 - x1) * F32(y2 - y1))
            if area < best_area:
                best_area, gt_index[a] = area, g
    return gt_index
