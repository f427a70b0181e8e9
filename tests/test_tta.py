"""Test-time augmentation: views, mirroring back, the merge against a loop NMS, and end to end on a trained model."""

import json

import jax
import numpy as np
import pytest

from atss_jax import checkpoint, coco_eval, evaluator, parallel, train, tta
from atss_jax.anchors import anchors_per_location
from atss_jax.models.detector import abstract_variables, build_detector
from configs import demo


def test_views_scale_canvas_and_cap_with_the_short_side():
    config = demo.get_config("tiny")  # canvas (128, 160), eval short side 128, long-side cap 160
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


def _iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def _loop_nms(boxes, scores, classes, valid, iou_threshold, max_detections):
    """Greedy class-wise NMS, one candidate at a time: the definition."""
    order = sorted((i for i in range(len(scores)) if valid[i]), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(classes[j] != classes[i] or _iou(boxes[j], boxes[i]) <= iou_threshold for j in kept):
            kept.append(i)
        if len(kept) == max_detections:
            break
    return kept


def _loop_merge(views, iou_threshold, max_detections):
    """Per image, the loop NMS over the candidates of every view, padded as `tta.merge_views` returns them."""
    num_images = len(views[0]["image_id"])
    merged = {"boxes": np.zeros((num_images, max_detections, 4), np.float32),
              "scores": np.zeros((num_images, max_detections), np.float32),
              "classes": np.zeros((num_images, max_detections), np.int32),
              "valid": np.zeros((num_images, max_detections), bool)}
    for image in range(num_images):
        candidates = {k: np.concatenate([v[k][image] for v in views]) for k in ("boxes", "scores", "classes", "valid")}
        kept = _loop_nms(candidates["boxes"], candidates["scores"], candidates["classes"], candidates["valid"],
                         iou_threshold, max_detections)
        for key in ("boxes", "scores", "classes"):
            merged[key][image, :len(kept)] = candidates[key][kept]
        merged["valid"][image, :len(kept)] = True
    return merged


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
    reference = _loop_merge(views, 0.5, 10)
    assert reference["valid"].sum(axis=1).min() >= 3  # several kept per image, some suppressed
    for key in ("boxes", "scores", "classes", "valid"):
        np.testing.assert_array_equal(merged[key], reference[key], err_msg=key)


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
    config = demo.get_config("tiny")
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
    summary = evaluator.evaluate_checkpoint(config, str(workdir))
    detections = json.loads((workdir / "eval" / "step_400" / "detections_host0.json").read_text())
    return summary, detections


def test_a_single_view_reproduces_the_plain_evaluation_exactly(trained):
    config, _, plain_summary, plain_detections = trained
    summary, detections = _evaluate_with_views(trained, (config.data.eval_min_size,), False)
    assert len(plain_detections) > 100
    assert detections == plain_detections
    assert summary["metrics"] == plain_summary["metrics"]


def test_flip_and_scales_give_the_loop_merge_of_the_separate_views(trained):
    """Two scales x flip: the evaluation's detections are the loop NMS over each view evaluated on its own,
    whatever that does to AP (on a 400-step model it may lower it)."""
    config, workdir, _, _ = trained
    _, merged_detections = _evaluate_with_views(trained, (112, 128), True)
    tta_config = config.copy_and_resolve_references()
    tta_config.eval.tta.min_sizes, tta_config.eval.tta.flip = (112, 128), True
    mesh = parallel.make_mesh()
    model = build_detector(config.model, anchors_per_location(config.anchors), axis_name=parallel.AXIS)
    replicated = jax.sharding.NamedSharding(mesh, parallel.REPLICATED_SPEC)
    variables = checkpoint.restore_variables(workdir, abstract_variables(model, tuple(config.data.canvas),
                                                                         replicated)).variables
    evaluate = evaluator.Evaluator(tta_config, model, mesh)
    assert [(v.short_side, v.flip) for v in evaluate.views] == [(112, False), (112, True), (128, False), (128, True)]
    predicted = [evaluate.predict(variables, view) for view in evaluate.views]
    views = [predictions for _, predictions, _ in predicted]
    reference = _loop_merge(views, config.eval.nms_iou_threshold, config.eval.max_detections)
    expected = coco_eval.detections_to_coco(views[0]["image_id"], reference["boxes"], reference["scores"],
                                            reference["classes"], reference["valid"], views[0]["original_size"],
                                            predicted[0][0].category_ids)
    assert len(expected) > 100

    def order(detection):
        return detection["image_id"], -detection["score"], detection["category_id"], detection["bbox"]

    assert sorted(merged_detections, key=order) == sorted(expected, key=order)
