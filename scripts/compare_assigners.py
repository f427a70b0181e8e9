r"""The assigners compared on the synthetic demo (README "Assigners"): AP at a fixed step budget, assignment
milliseconds per batch and positives per box, one table.

    python -m scripts.compare_assigners --root=/tmp/assigners                 # the demo's 1250 steps, every assigner
    python -m scripts.compare_assigners --root=/tmp/a --steps=20 --assigners=atss,tal --config.data.data_dir=/tmp/d

Each assigner trains its variant of configs/demo_assigners.py (``--config``) for ``--steps`` (scripts/sweep.py
over the variants, runs in ``<root>/<assigner>``; TAL's ATSS warmup is the first third of the budget; finished
runs are collected, not trained again). Then, on one training batch, each trained model's predictions are
assigned by its own assigner, jitted and batched: the median time of ``--repeats`` calls and the mean positives
per valid box. Writes ``<root>/compare_assigners.{md,json,png}`` (the AP table and plot) and
``<root>/assigners.{md,json}`` (the comparison). Other ``--config.*`` flags go to every run.
"""

import json
import statistics
import sys
import time

import jax
import numpy as np
from absl import flags
from etils import epath
from ml_collections import config_flags

from atss_jax import boxes as box_lib
from atss_jax import checkpoint, cli, workdirs
from atss_jax.anchors import anchor_valid_mask, anchors_per_location, build_anchor_grid
from atss_jax.assigners import PREDICTION_AWARE, Predictions, build_assigner, is_prediction_aware
from atss_jax.data import pipeline
from atss_jax.models.detector import abstract_variables, build_detector
from scripts import sweep

CONFIG_FILE = "configs/demo_assigners.py"

# Defined so that --config.* overrides parse; each run reads them from the command line (scripts/sweep.py).
config_flags.DEFINE_config_file("config", CONFIG_FILE, "The comparison's config file (its variants: the assigners).")
_ROOT = flags.DEFINE_string("root", None, "One workdir per assigner is made under it.")
_STEPS = flags.DEFINE_integer("steps", 1250, "Training steps of every run (the budget).")
_ASSIGNERS = flags.DEFINE_list("assigners", ["atss", *PREDICTION_AWARE], "Assigners compared.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed assignments of the batch per assigner.")
flags.mark_flags_as_required(["root"])


def measure(workdir: epath.Path, repeats: int) -> dict[str, float]:
    """Assignment ms per batch and positives per box of the run in ``workdir``, on its first training batch."""
    config = workdirs.read_config(workdir)
    canvas = tuple(config.data.canvas)
    model = build_detector(config.model, anchors_per_location(config.anchors))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    variables = checkpoint.restore_variables(workdir, abstract_variables(model, canvas, sharding)).variables
    batch = next(pipeline.train_dataset(config.data, global_batch=config.train.global_batch, seed=config.seed,
                                        process_index=0, process_count=1).as_numpy_iterator())
    grid = build_anchor_grid(config.anchors, batch["image"].shape[1:3])
    anchor_valid = anchor_valid_mask(grid.centers, batch["image_size"])
    class_logits, box_regression, _ = jax.jit(lambda v, i, s: model.apply(v, i, s, train=False))(
        variables, batch["image"], batch["image_size"])
    assign = build_assigner(config.assigner, grid)
    if is_prediction_aware(config.assigner):
        predictions = Predictions(jax.nn.sigmoid(class_logits), box_lib.decode_regression(
            config.model.head.regression, grid.boxes, grid.anchor_strides, box_regression, config.model.head.box_coder))
        args = (anchor_valid, batch["boxes"], batch["box_valid"], batch["labels"], predictions,
                np.int32(config.train.num_steps))  # the assigner the end of training uses

        def result(*a):
            return assign(*a).result
    else:
        args, result = (anchor_valid, batch["boxes"], batch["box_valid"]), assign
    compiled = jax.jit(result).lower(*args).compile()
    assignment = compiled(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    valid = np.asarray(batch["box_valid"])
    return {"assign_ms": 1e3 * statistics.median(times),
            "positives_per_box": float(np.asarray(assignment.num_positives)[valid].mean()),
            "batch": int(valid.shape[0])}


def main(argv):
    del argv
    root = epath.Path(_ROOT.value)
    passthrough = [f"--config.train.num_steps={_STEPS.value}",
                   f"--config.assigner.warmup_assigner_steps={_STEPS.value // 3}",
                   *[a for a in sweep.passthrough_flags("assigner.name")
                     if not a.startswith(("--config.train.num_steps", "--config.assigner.warmup_assigner_steps"))]]
    if not any(a.startswith("--config.train.checkpoint_every") for a in passthrough):
        passthrough.append(f"--config.train.checkpoint_every={_STEPS.value}")  # the last step, which measure reads
    sweep.sweep(config_flags.get_config_filename(flags.FLAGS["config"]), str(root), sweep.VARIANT,
                _ASSIGNERS.value, passthrough, name=lambda field, value: value, label="assigner",
                stem="compare_assigners")
    ap = json.loads((root / "compare_assigners.json").read_text())
    rows = {name: {"AP": ap[name]["AP"], "AP50": ap[name]["AP50"], **measure(root / name, _REPEATS.value)}
            for name in _ASSIGNERS.value if name in ap}
    lines = [f"| assigner | AP ({_STEPS.value} steps) | AP50 | assignment ms / batch | positives / box |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {100 * r['AP']:.1f} | {100 * r['AP50']:.1f} | {r['assign_ms']:.1f} | "
              f"{r['positives_per_box']:.1f} |" for name, r in rows.items()]
    table = "\n".join(lines)
    device = jax.devices()[0].device_kind
    batch = next(iter(rows.values()))["batch"]
    print(f"\n{table}\n(batch {batch}, {device})")
    (root / "assigners.md").write_text(f"{table}\n\nAssignment timed on a batch of {batch} on {device}.\n")
    (root / "assigners.json").write_text(json.dumps({"steps": _STEPS.value, "device": device, "rows": rows,
                                                     "argv": sys.argv[1:]}, indent=1))


if __name__ == "__main__":
    cli.run(main, "compare_assigners")
