"""The trainer: 1 vs 8 devices, resume after preemption, evaluation, errors, export and prediction."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from atss_jax import checkpoint, evaluate, train
from atss_jax.data import pipeline, synthetic
from atss_jax.inference import Detector
from atss_jax.models.detector import build_detector
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
    config = tiny.get_config()
    config.data.data_dir = data_dir
    return config


def _run_training(workdir, data_dir, devices, *overrides):
    """Trains the tiny config in a fresh process with `devices` simulated CPU devices."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "atss_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _final_state(config, workdir):
    return jax.device_get(train.restore_training(config, workdir, require_checkpoint=True)[-1])


def _scalars(workdir, tag):
    values = {}
    for name in os.listdir(workdir):
        if name.startswith("events.out"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                for value in event.summary.value:
                    if value.tag == tag:
                        values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


@pytest.fixture(scope="module")
def trained(synthetic_data_config, tmp_path_factory):
    """The tiny config trained for 3 steps on 1 device and on 8 simulated devices (same global batch)."""
    data_dir = synthetic_data_config.data_dir
    workdirs = {}
    for devices in (1, 8):
        workdir = str(tmp_path_factory.mktemp(f"train_{devices}"))
        result = _run_training(workdir, data_dir, devices)
        assert result.returncode == 0, result.stderr[-3000:]
        workdirs[devices] = workdir
    return data_dir, workdirs


def test_one_and_eight_devices_agree(trained):
    data_dir, workdirs = trained
    config = _config(data_dir)
    losses = [_scalars(workdirs[d], "loss") for d in (1, 8)]
    assert sorted(losses[0]) == [1, 2, 3]
    np.testing.assert_allclose([losses[1][s] for s in (1, 2, 3)], [losses[0][s] for s in (1, 2, 3)], rtol=1e-4)
    one, eight = (_final_state(config, workdirs[d]) for d in (1, 8))
    assert int(one.step) == int(eight.step) == 3
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    moved = sum(float(jnp.abs(a - b).sum()) for a, b in zip(
        jax.tree.leaves(one.params), jax.tree.leaves(_initial_params(config))))
    assert moved > 0, "training must change the parameters"


def _initial_params(config):
    canvas = pipeline.canvases(config.data)[0]
    model = build_detector(config.model, train.anchor_grid(config, canvas).anchors_per_location)
    state, _ = train.create_train_state(config, model, canvas, train.make_mesh())
    return jax.device_get(state.params)


def test_evaluation_writes_the_twelve_coco_numbers(trained):
    _, workdirs = trained
    with open(os.path.join(workdirs[1], "metrics.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 3
    assert list(summary["metrics"]) == list(evaluate.METRIC_NAMES)
    assert len(summary["per_class_ap"]) == 4
    assert os.path.exists(os.path.join(workdirs[1], "eval", "step_3", "detections_0.png"))


def test_resume_after_preemption_equals_an_uninterrupted_run(trained, tmp_path, monkeypatch):
    data_dir, workdirs = trained
    config = _config(data_dir)
    monkeypatch.setattr(checkpoint.TrainCheckpoints, "should_stop", lambda self, step: step == 2)
    assert train.train_and_evaluate(config, str(tmp_path)) is None  # stopped after saving step 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    monkeypatch.setattr(checkpoint.TrainCheckpoints, "should_stop", lambda self, step: False)
    train.train_and_evaluate(config, str(tmp_path))
    resumed, uninterrupted = _final_state(config, str(tmp_path)), _final_state(config, workdirs[1])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sigterm_requests_a_stop(tmp_path):
    checkpoints = checkpoint.TrainCheckpoints(tmp_path, tiny.get_config().train)
    assert not checkpoints.should_stop(1)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert checkpoints.should_stop(2)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_export_detector_predicts_what_evaluation_detected(trained, tmp_path):
    from scripts import export

    data_dir, workdirs = trained
    config = _config(data_dir)
    config.eval.score_threshold = 0.0  # an untrained model: keep its low-score detections to compare
    train.evaluate_checkpoint(config, workdirs[1])
    with open(os.path.join(workdirs[1], "eval", "step_3", "detections_host0.json")) as f:
        evaluated = json.load(f)
    export.export(config, workdirs[1], str(tmp_path / "export"))
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
    built = evaluate.ground_truth_from_split(split)
    path = os.path.join(synthetic.source_dir(synthetic_data_config.synthetic, synthetic_data_config.data_dir),
                        "annotations", "instances_validation.json")
    official = evaluate.load_ground_truth(path)
    rng = np.random.default_rng(0)
    detections = []
    for annotation in official["annotations"]:
        x, y, w, h = annotation["bbox"]
        jitter = rng.normal(0, 2, 4)
        detections.append({"image_id": annotation["image_id"], "category_id": int(rng.choice([1, 2, 3, 4])),
                           "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1)],
                           "score": float(rng.random())})
    reference, reference_per_class = evaluate.coco_metrics(official, detections, "pycocotools")
    assert 0 < reference["AP"] < 1
    for evaluator in evaluate.EVALUATORS:
        ours, ours_per_class = evaluate.coco_metrics(built, detections, evaluator)
        assert ours == pytest.approx(reference, abs=1e-6), evaluator
        assert ours_per_class == pytest.approx(reference_per_class, abs=1e-6), evaluator


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
    with pytest.raises(train.NonFiniteLossError, match="non-finite at step 1;"):
        train.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == [], "nothing is saved once training diverged"
