"""Test-time augmentation: views, mirroring back, the merge against a loop NMS, and end to end on a trained model."""

import json

import numpy as np
import pytest

from atss_jax import boxes as box_lib
from atss_jax import train, tta
from configs import tiny


def test_views_scale_canvas_and_cap_with_the_short_side():
    config = tiny.get_config()  # canvas (128, 160), eval short side 128, long-side cap 160
    config.eval.tta.min_sizes = (128, 144, 64)
    config.eval.tta.flip = True
    views = tta.views(config)
    assert [(v.short_side, v.flip) for v in views] == [(128, False), (128, True), (144, False), (144, True),
                                                       (64, False), (64, True)]
    plain = views[0].data_config
    assert tuple(plain.canvas) == tuple(config.data.canvas) and plain.max_size == config.data.max_size
    assert plain.eval_min_size == 128
    assert tuple(views[2].data_config.canvas) == (160, 192)  # 144 x 1.125 -> 160, 180 -> 192 (multiples of 32)
    assert views[2].data_config.max_size == 180
    assert tuple(views[4].data_config.canvas) == (64, 96) and views[4].data_config.max_size == 80
    config.eval.tta.min_sizes = (128, 0)
    with pytest.raises(ValueError, match="positive"):
        tta.views(config)


def test_unflip_boxes_by_hand():
    boxes = np.array([[[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 50.0]]], np.float32)
    sizes = np.array([[50, 100]])
    np.testing.assert_array_equal(tta.unflip_boxes(boxes, sizes),
                                  [[[70.0, 5.0, 90.0, 25.0], [0.0, 0.0, 100.0, 50.0]]])
    np.testing.assert_array_equal(tta.unflip_boxes(tta.unflip_boxes(boxes, sizes), sizes), boxes)


def _loop_nms(boxes, scores, classes, valid, iou_threshold, max_detections):
    """Greedy class-wise NMS, one candidate at a time: the definition."""
    order = sorted((i for i in range(len(scores)) if valid[i]), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(classes[j] != classes[i] or float(box_lib.elementwise_iou(boxes[j], boxes[i])) <= iou_threshold
               for j in kept):
            kept.append(i)
        if len(kept) == max_detections:
            break
    return kept


def _random_view(rng, num_images, detections, num_classes=3):
    corner = rng.uniform(0, 80, (num_images, detections, 2))
    size = rng.uniform(5, 40, (num_images, detections, 2))
    return {"image_id": np.arange(num_images) * 7,
            "boxes": np.concatenate([corner, corner + size], -1).astype(np.float32),
            "scores": rng.uniform(0, 1, (num_images, detections)).astype(np.float32),
            "classes": rng.integers(0, num_classes, (num_images, detections)).astype(np.int32),
            "valid": rng.uniform(size=(num_images, detections)) < 0.8}


def test_merge_matches_a_loop_nms_over_all_views():
    rng = np.random.default_rng(0)
    views = [_random_view(rng, 5, 12) for _ in range(3)]
    merged = tta.merge_views(views, iou_threshold=0.5, max_detections=10, images_per_call=2)
    assert merged["boxes"].shape == (5, 10, 4)
    for image in range(5):
        candidates = {k: np.concatenate([v[k][image] for v in views]) for k in ("boxes", "scores", "classes", "valid")}
        kept = _loop_nms(candidates["boxes"], candidates["scores"], candidates["classes"], candidates["valid"],
                         0.5, 10)
        count = int(merged["valid"][image].sum())
        assert count == len(kept)
        np.testing.assert_array_equal(merged["boxes"][image, :count], candidates["boxes"][kept])
        np.testing.assert_array_equal(merged["scores"][image, :count], candidates["scores"][kept])
        np.testing.assert_array_equal(merged["classes"][image, :count], candidates["classes"][kept])


def test_views_of_different_images_are_refused():
    rng = np.random.default_rng(1)
    first, second = _random_view(rng, 3, 4), _random_view(rng, 3, 4)
    second["image_id"] = second["image_id"][::-1]
    with pytest.raises(ValueError, match="different images"):
        tta.merge_views([first, second], iou_threshold=0.5, max_detections=4)


@pytest.fixture(scope="module")
def trained(synthetic_data_config, tmp_path_factory):
    """A tiny model trained for 400 steps on the tiny synthetic set, and its plain evaluation.

    Evaluation reads the training images: what the check needs is a model that detects well (about 45
    AP here); held-out AP at that level needs minutes more training than a test can take.
    """
    config = tiny.get_config()
    config.data.data_dir = synthetic_data_config.data_dir
    config.data.eval_split = "train"
    config.train.num_steps = 400
    config.train.checkpoint_every = 1000
    config.train.log_every = 100
    config.optimizer.base_lr = 0.05
    config.optimizer.warmup_steps = 30
    config.optimizer.warmup_factor = 0.001
    config.optimizer.clip_grad_norm = 10.0
    config.eval.batch_per_device = 8
    workdir = tmp_path_factory.mktemp("tta_train")
    summary = train.train_and_evaluate(config, str(workdir))
    detections = json.loads((workdir / "eval" / "step_400" / "detections_host0.json").read_text())
    return config, workdir, summary, detections


def _evaluate_with_views(trained, min_sizes, flip):
    config, workdir, _, _ = trained
    config = config.copy_and_resolve_references()
    config.eval.tta.min_sizes = min_sizes
    config.eval.tta.flip = flip
    summary = train.evaluate_checkpoint(config, str(workdir))
    detections = json.loads((workdir / "eval" / "step_400" / "detections_host0.json").read_text())
    return summary, detections


def test_a_single_view_reproduces_the_plain_evaluation_exactly(trained):
    config, _, plain_summary, plain_detections = trained
    summary, detections = _evaluate_with_views(trained, (config.data.eval_min_size,), False)
    assert len(plain_detections) > 100
    assert detections == plain_detections
    assert summary["metrics"] == plain_summary["metrics"]


def test_multi_scale_and_flip_do_not_lower_ap(trained):
    _, _, plain_summary, _ = trained
    plain = plain_summary["metrics"]
    assert plain["AP"] > 0.3  # a model worth augmenting
    flipped, _ = _evaluate_with_views(trained, (128,), True)
    multi_scale, _ = _evaluate_with_views(trained, (112, 128), True)
    for summary in (flipped, multi_scale):
        assert summary["metrics"]["AP"] >= plain["AP"]
        assert summary["metrics"]["AP50"] >= plain["AP50"] - 0.005
