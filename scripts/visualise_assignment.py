r"""Draws one image's ATSS assignment, one panel per FPN level: the ground-truth boxes, each box's
k nearest candidate anchors (open circles) and the anchors finally positive for it (filled, with the
anchor box of the first one dashed), with each box's IoU threshold and positive count in the legend.

    python -m scripts.visualise_assignment --config=configs/demo.py --index=3 --out=/tmp/assignment.png
"""

import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import flags
from etils import epath
from ml_collections import config_flags

from atss_jax import boxes as box_lib
from atss_jax.anchors import anchor_valid_mask, build_anchor_grid
from atss_jax.assigners import build_assigner
from atss_jax.assigners.atss import level_candidates
from atss_jax.data import pipeline

matplotlib.use("Agg")
from matplotlib import patches, pyplot

from atss_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.")
_SPLIT = flags.DEFINE_string("split", "validation", "Dataset split.")
_INDEX = flags.DEFINE_integer("index", 0, "Example index in the split (evaluation order, no augmentation).")
_OUT = flags.DEFINE_string("out", "assignment.png", "Output PNG.")


def main(argv):
    del argv
    config = _CONFIG.value
    data = pipeline.eval_dataset(config.data, batch_per_host=1, split_name=_SPLIT.value, process_index=0,
                                 process_count=1)
    batch = next(iter(data.dataset.skip(_INDEX.value).as_numpy_iterator()))
    canvas = batch["image"].shape[1:3]
    grid = build_anchor_grid(config.anchors, canvas)
    anchor_valid = anchor_valid_mask(grid.centers, batch["image_size"])
    result = build_assigner(config.assigner, grid)(anchor_valid, batch["boxes"], batch["box_valid"])
    gt_index = np.asarray(result.gt_index[0])
    boxes = batch["boxes"][0][batch["box_valid"][0]]
    candidates = np.asarray(level_candidates(jnp.asarray(grid.centers), anchor_valid[0], box_lib.box_centers(
        jnp.asarray(boxes)), grid.level_sizes, config.assigner.topk * grid.anchors_per_location))
    level_of_anchor = np.repeat(np.arange(len(grid.level_sizes)), grid.level_sizes)
    colours = pyplot.get_cmap("tab10")
    height, width = batch["image_size"][0]
    figure, axes = pyplot.subplots(1, len(grid.level_sizes), figsize=(4 * len(grid.level_sizes), 4.5))
    for level, axis in enumerate(axes):
        axis.imshow(batch["image"][0][:height, :width])
        axis.set_title(f"P{level + 3} (stride {grid.strides[level]})")
        axis.axis("off")
        for g, (x1, y1, x2, y2) in enumerate(boxes):
            colour = colours(g % 10)
            label = (f"box {g}: thr {float(result.iou_threshold[0, g]):.2f}, "
                     f"{int(result.num_positives[0, g])} pos") if level == 0 else None
            axis.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=2, label=label))
            mine = candidates[g][level_of_anchor[candidates[g]] == level]
            axis.scatter(*grid.centers[mine].T, s=30, facecolors="none", edgecolors=[colour])
            positive = np.flatnonzero((gt_index == g) & (level_of_anchor == level))
            axis.scatter(*grid.centers[positive].T, s=30, color=[colour])
            for ax1, ay1, ax2, ay2 in grid.boxes[positive[:1]]:
                axis.add_patch(patches.Rectangle((ax1, ay1), ax2 - ax1, ay2 - ay1, fill=False, color=colour,
                                                 ls="--", lw=1))
        axis.set_xlim(0, width)
        axis.set_ylim(height, 0)
    figure.legend(loc="lower center", ncol=min(len(boxes), 4), fontsize=8)
    figure.suptitle(f"{config.assigner.name} assignment (k={config.assigner.topk}), image id {batch['image_id'][0]}")
    with epath.Path(_OUT.value).open("wb") as f:  # the output may be in a bucket
        figure.savefig(f, format="png", dpi=100, bbox_inches="tight")
    print(f"Wrote {_OUT.value}")


if __name__ == "__main__":
    cli.run(main, "visualise_assignment")
