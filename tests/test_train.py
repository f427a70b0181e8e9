"""The trainer: 1 vs 8 devices, resume after preemption, evaluation, errors, export and prediction."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from atss_jax import checkpoint, coco_eval, evaluator, train, train_step
from atss_jax.anchors import anchors_per_location
from atss_jax.data import pipeline, synthetic
from atss_jax.models.detector import abstract_variables, build_detector
from atss_jax.serving import Detector
from configs import demo
from tests.support import cpu_flags, hangs

pytestmark = pytest.mark.e2e  # README "Tests": the slow tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
    config = demo.get_config("tiny")
    config.data.data_dir = data_dir
    return config


def _run_training(workdir, data_dir, devices, *overrides):
    """Trains the tiny config in a fresh process with `devices` simulated CPU devices."""
    env = {**os.environ, "XLA_FLAGS": cpu_flags.with_devices(devices)}
    command = [sys.executable, "-m", "atss_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=hangs.SUBPROCESS_S)


def _final_state(config, workdir, step=None):
    """The train state of checkpoint `step` (default: the latest) of `workdir`."""
    checkpoints = checkpoint.TrainCheckpoints(checkpoint.checkpoint_dir(workdir), config.train)
    assert checkpoints.manager.latest_step() is not None, f"no checkpoint in {workdir}"
    return jax.device_get(checkpoints.restore(train_step.create_training(config).state, step))


def _scalars(workdir, tag):
    values = {}
    for name in os.listdir(workdir):
        if name.startswith("events.out"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                for value in event.summary.value:
                    if value.tag == tag:
                        values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


# What two runs of the same training on differently split devices may differ by, and what they may not.
#
# Exact by construction: everything computed from the data alone. The assignment statistics are sums
# of integers (box and positive counts, exact in float32 below 2**24), so equal batches give equal
# values whatever the order of the sums; a host or device reading another shard changes them.
DATA_METRICS = ("boxes_per_image", "assign/positives_per_box", "assign/boxes_without_positive")
# Float rounding only: the first step starts from the same initial parameters (same seed) on the same
# images, and the runs differ only in the order float32 sums are taken (gradients averaged over 1 or 8
# devices, or across 2 processes; convolutions over batches of another size). The step-1 loss is a mean
# of at most 8 per-device losses: it moves by a few float32 ulps (measured: 7e-8 relative). A leaf's
# first update (learning rate x averaged gradient) moves by rounding relative to the magnitudes of the
# terms summed, which can exceed the update itself where they cancel: measured up to 2e-4 of a leaf's
# update norm (a stride-2 shortcut kernel, 1 vs 8 devices), and pure noise for the biases in front of a
# GroupNorm, whose true gradient is zero; so each leaf is compared with the larger of its own update
# and an average-sized one (the whole update's RMS per element). A host reading another shard, or a
# sum instead of a mean, changes updates by order 1; 1e-2 sits 50x from both. Later steps are not
# compared this tightly: SGD amplifies rounding from step to step, by amounts that depend on the CPU
# (2.4e-4 absolute after 3 steps on one machine).
FIRST_LOSS_RTOL = 1e-5
FIRST_UPDATE_RTOL = 1e-2


def assert_same_training(workdirs, config):
    """The runs in `workdirs` read the same data at each of their first ``config.train.num_steps`` steps and took
    the same first step (see above)."""
    reference, *others = workdirs
    steps = range(1, config.train.num_steps + 1)
    for tag in DATA_METRICS:
        expected = {step: _scalars(reference, tag)[step] for step in steps}
        for other in others:
            assert {step: _scalars(other, tag).get(step) for step in steps} == expected, tag
    first_losses = [_scalars(w, "loss")[1] for w in workdirs]
    np.testing.assert_allclose(first_losses[1:], [first_losses[0]] * len(others), rtol=FIRST_LOSS_RTOL)
    initial = _initial_params(config)
    updates = [jax.tree.map(np.subtract, _final_state(config, w, step=1).params, initial) for w in workdirs]
    leaves = jax.tree_util.tree_leaves_with_path(updates[0])
    rms = np.sqrt(sum(float(np.sum(u**2)) for _, u in leaves) / sum(u.size for _, u in leaves))
    assert rms > 0, "step 1 must change the parameters"
    for other in updates[1:]:
        for (path, expected), got in zip(leaves, jax.tree.leaves(other)):
            scale = max(np.linalg.norm(expected), rms * np.sqrt(expected.size))
            assert np.linalg.norm(got - expected) <= FIRST_UPDATE_RTOL * scale, jax.tree_util.keystr(path)


def test_one_device_and_eight_on_two_hosts_agree(tiny_trainings):
    """Per-device semantics across devices and processes: 2 processes x 4 devices train like 1 device."""
    data_dir, workdirs = tiny_trainings
    config = _config(data_dir)
    assert_same_training([workdirs[1], workdirs[8]], config)
    assert int(_final_state(config, workdirs[1]).step) == int(_final_state(config, workdirs[8]).step) == 3


def _initial_params(config):
    return jax.device_get(train_step.create_training(config).state.params)


def test_evaluation_writes_the_twelve_coco_numbers(tiny_trainings):
    _, workdirs = tiny_trainings
    with open(os.path.join(workdirs[1], "metrics.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 3
    assert list(summary["metrics"]) == list(coco_eval.METRIC_NAMES)
    assert len(summary["per_class_ap"]) == 4
    assert os.path.exists(os.path.join(workdirs[1], "eval", "step_3", "detections_0.png"))


def test_resume_after_preemption_equals_an_uninterrupted_run(tiny_trainings, tmp_path, monkeypatch):
    data_dir, workdirs = tiny_trainings
    config = _config(data_dir)
    monkeypatch.setattr(checkpoint.TrainCheckpoints, "should_stop", lambda self, step: step == 2)
    assert train.train_and_evaluate(config, str(tmp_path)) is None  # stopped after saving step 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    monkeypatch.setattr(checkpoint.TrainCheckpoints, "should_stop", lambda self, step: False)
    train.train_and_evaluate(config, str(tmp_path))
    resumed, uninterrupted = _final_state(config, str(tmp_path)), _final_state(config, workdirs[1])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_variables_only_restore_equals_the_train_state_and_names_missing_steps(tiny_trainings, tmp_path):
    data_dir, workdirs = tiny_trainings
    config = _config(data_dir)
    model = build_detector(config.model, anchors_per_location(config.anchors))
    abstract = abstract_variables(model, tuple(config.data.canvas))
    restored = checkpoint.restore_variables(workdirs[1], abstract, step=2)
    state = _final_state(config, workdirs[1], step=2)
    assert restored.step == 2
    expected = {"params": state.params, **state.model_state}
    assert jax.tree.structure(restored.variables) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored.variables), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoint.CheckpointError, match=r"step 7 .*\[1, 2, 3\]"):
        checkpoint.restore_variables(workdirs[1], abstract, step=7)
    with pytest.raises(checkpoint.CheckpointError, match="No checkpoint in"):
        checkpoint.restore_variables(tmp_path, abstract)


def test_sigterm_requests_a_stop(tmp_path):
    checkpoints = checkpoint.TrainCheckpoints(tmp_path, demo.get_config("tiny").train)
    assert not checkpoints.should_stop(1)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert checkpoints.should_stop(2)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_export_detector_predicts_what_evaluation_detected(tiny_trainings, tmp_path):
    from atss_jax import serving_export

    data_dir, workdirs = tiny_trainings
    config = _config(data_dir)
    config.eval.score_threshold = 0.0  # an untrained model: keep its low-score detections to compare
    evaluator.evaluate_checkpoint(config, workdirs[1])
    with open(os.path.join(workdirs[1], "eval", "step_3", "detections_host0.json")) as f:
        evaluated = json.load(f)
    serving_export.export_workdir(config, workdirs[1], str(tmp_path / "export"))
    detector = Detector(str(tmp_path / "export"), batch_size=2)
    image_dir = os.path.join(synthetic.source_dir(config.data.synthetic, data_dir), "images", "validation")
    files = sorted(os.listdir(image_dir))[:3]
    results = detector.predict_files([os.path.join(image_dir, f) for f in files])
    for name, result in zip(files, results):
        image_id = int(name.split(".")[0]) + 1
        expected = sorted(((d["score"], d["category_id"], *d["bbox"]) for d in evaluated if d["image_id"] == image_id),
                          reverse=True)
        got = sorted(((float(s), int(c), x1, y1, x2 - x1, y2 - y1) for s, c, (x1, y1, x2, y2) in
                      zip(result["scores"], result["category_ids"], result["boxes"])), reverse=True)
        assert len(got) == len(expected) > 0
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-3)


def test_ground_truth_from_tfds_and_both_evaluators_equal_the_official_path(synthetic_data_config):
    split = pipeline.open_split(synthetic_data_config, "validation")
    built = coco_eval.ground_truth_from_split(split)
    path = os.path.join(synthetic.source_dir(synthetic_data_config.synthetic, synthetic_data_config.data_dir),
                        "annotations", "instances_validation.json")
    official = coco_eval.load_ground_truth(path)
    rng = np.random.default_rng(0)
    detections = []
    for annotation in official["annotations"]:
        x, y, w, h = annotation["bbox"]
        jitter = rng.normal(0, 2, 4)
        detections.append({"image_id": annotation["image_id"], "category_id": int(rng.choice([1, 2, 3, 4])),
                           "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1)],
                           "score": float(rng.random())})
    reference, reference_per_class = coco_eval.coco_metrics(official, detections, "pycocotools")
    assert 0 < reference["AP"] < 1
    for scorer in coco_eval.EVALUATORS:
        ours, ours_per_class = coco_eval.coco_metrics(built, detections, scorer)
        assert ours == pytest.approx(reference, abs=1e-6), scorer
        assert ours_per_class == pytest.approx(reference_per_class, abs=1e-6), scorer


def test_misspelt_config_key_is_a_clear_error(tmp_path):
    result = _run_training(str(tmp_path), str(tmp_path), 1, "--config.assigner.topkk=7")
    assert result.returncode != 0
    assert "topkk" in result.stderr


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = _run_training(str(tmp_path), str(tmp_path / "empty"), 1, "--config.data.name=coco/2017")
    assert result.returncode != 0
    assert "is not prepared" in result.stderr and "prepare_data" in result.stderr


def test_non_finite_loss_stops_training_naming_the_step(synthetic_data_config, tmp_path):
    config = _config(synthetic_data_config.data_dir)
    config.optimizer.base_lr = float("inf")
    with pytest.raises(train_step.NonFiniteLossError, match="non-finite at step 1;"):
        train.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == [], "nothing is saved once training diverged"
