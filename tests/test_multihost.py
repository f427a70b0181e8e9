"""A simulated multi-host job restores and evaluates with the multi-host merge: the shared 2-host training
(2 processes x 4 CPU devices on localhost, started with SLURM's variables; ``tiny_trainings``, which
test_train checks against 1 device) evaluated by 2 processes that name their coordinator explicitly equals
the same checkpoint evaluated by 1 process x 8 devices. tests/test_cluster_launch.py starts the other
launchers' layouts.
"""

import json
import os
import shutil

import numpy as np
import pytest

from tests.support import launch
from tests.test_train import _run_training

pytestmark = pytest.mark.e2e  # README "Tests": the slow tier


def test_two_hosts_restore_and_evaluate_with_the_merge(tiny_trainings, tmp_path):
    data_dir, trainings = tiny_trainings
    multi, single = str(tmp_path / "two_hosts"), str(tmp_path / "one_host")
    for copy in (multi, single):  # evaluation writes into the workdir
        shutil.copytree(trainings[8], copy)
    outputs = launch.run_two_hosts(multi, data_dir, "--mode=eval", "--config.eval.score_threshold=0.0",
                                   detected=False)
    assert "COCO box metrics" in outputs[0][0] and "COCO box metrics" not in outputs[1][0]
    merged = []
    for host in range(2):
        with open(os.path.join(multi, "eval", "step_3", f"detections_host{host}.json")) as f:
            part = json.load(f)
        assert part, f"host {host} evaluated no image"
        merged += part
    _run_training(single, data_dir, 8, "--mode=eval", "--config.eval.score_threshold=0.0")
    with open(os.path.join(single, "eval", "step_3", "detections_host0.json")) as f:
        reference = json.load(f)
    assert len(merged) == len(reference)
    # Equal scores can come out of NMS in either order, so match each detection to its nearest.
    groups = {}
    for d in reference:
        groups.setdefault((d["image_id"], d["category_id"]), []).append(d["bbox"] + [d["score"]])
    for d in merged:
        candidates = np.array(groups[(d["image_id"], d["category_id"])])
        distance = np.abs(candidates - np.array(d["bbox"] + [d["score"]])).max(axis=1)
        assert distance.min() < 1e-2, d
    with open(os.path.join(multi, "metrics.json")) as f, open(os.path.join(single, "metrics.json")) as g:
        assert json.load(f)["metrics"] == pytest.approx(json.load(g)["metrics"], abs=1e-6)
