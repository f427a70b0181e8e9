"""Loop references of the official test-time augmentation merge (atss_core/engine/bbox_aug_vote.py).

They follow soft_bbox_vote, bbox_vote and the 1000-detection cut of merge_result_from_multi_scales in the
official convention: inclusive pixels, widths ``x2 - x1 + 1``. ``official_merge`` takes this project's
continuous boxes, moves them into that convention (``x2 - 1``) and its output back, which also checks that
the two conventions give the same overlaps.
"""

import numpy as np


def official_iou_row(top, rest):
    """IoU of one inclusive-pixel box with each of ``rest`` [K, 4], the official "+1" formula."""
    area = (rest[:, 2] - rest[:, 0] + 1) * (rest[:, 3] - rest[:, 1] + 1)
    top_area = (top[2] - top[0] + 1) * (top[3] - top[1] + 1)
    w = np.maximum(0.0, np.minimum(top[2], rest[:, 2]) - np.maximum(top[0], rest[:, 0]) + 1)
    h = np.maximum(0.0, np.minimum(top[3], rest[:, 3]) - np.maximum(top[1], rest[:, 1]) + 1)
    inter = w * h
    return inter / (top_area + area - inter)


def official_vote_one_class(boxes, scores, vote_threshold, soft, soft_score_threshold):
    """One class's candidates -> [K, 5] (box, score) rows, as the official (soft_)bbox_vote."""
    if len(scores) <= 1:  # the official vote returns nothing and the caller keeps the input as it is
        return np.concatenate([boxes, scores[:, None]], 1)
    pool = [(boxes[i], scores[i]) for i in sorted(range(len(scores)), key=lambda i: -scores[i])]
    out = []
    while pool:
        top = pool[0][0]
        overlaps = official_iou_row(top, np.stack([b for b, _ in pool]))
        members = [(b, s, o) for (b, s), o in zip(pool, overlaps) if o >= vote_threshold]
        pool = [(b, s) for (b, s), o in zip(pool, overlaps) if o < vote_threshold]
        if len(members) == 1:
            out.append([*members[0][0], members[0][1]])
            continue
        total = sum(s for _, s, _ in members)
        out.append([*(sum(s * b for b, s, _ in members) / total), max(s for _, s, _ in members)])
        if soft:
            out += [[*b, s * (1 - o)] for b, s, o in members if s * (1 - o) >= soft_score_threshold]
    return np.array(out, np.float64).reshape(-1, 5)


def official_merge(boxes, scores, classes, valid, vote_threshold, soft, soft_score_threshold, max_detections):
    """All classes, then the official cut: every row scoring at least the ``max_detections``-th best.

    Returns:
      [K, 6] rows (x1, y1, x2, y2, score, class), continuous boxes, best first.
    """
    inclusive = boxes.astype(np.float64) - np.array([0, 0, 1, 1])
    rows = []
    for label in np.unique(classes[valid]):
        selected = valid & (classes == label)
        voted = official_vote_one_class(inclusive[selected], scores[selected].astype(np.float64), vote_threshold,
                                         soft, soft_score_threshold)
        rows += [[*row[:4] + np.array([0, 0, 1, 1]), row[4], label] for row in voted]
    rows = np.array(rows).reshape(-1, 6)
    if len(rows) > max_detections:
        rows = rows[rows[:, 4] >= np.sort(rows[:, 4])[::-1][max_detections - 1]]
    return rows[np.argsort(-rows[:, 4], kind="stable")]
