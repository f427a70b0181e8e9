"""Test-time augmentation: the official views, mirroring back, the merges against loop references, and end to end
on a trained model."""

import json

import numpy as np
import pytest

from atss_jax import coco_eval, evaluator, train, tta
from configs import atss_x101_64x4d_dcnv2_fpn_ms_2x_coco_tta, demo
from tests.reference_tta import official_merge


def test_views_of_the_official_config():
    """configs/atss/atss_dcnv2_X_101_64x4d_FPN_2x.yaml TEST.BBOX_AUG through bbox_aug_vote.py: the plain view
    and its mirror, then each scale and its mirror; caps MAX_SIZE_TEST (1333) below 800, else MAX_SIZE (3000)."""
    config = atss_x101_64x4d_dcnv2_fpn_ms_2x_coco_tta.get_config()
    scales = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800)
    ranges = ((96, 10000), (96, 10000), (64, 10000), (64, 10000), (64, 10000), (0, 10000), (0, 10000), (0, 256),
              (0, 256), (0, 192), (0, 192), (0, 96))
    views = tta.views(config)
    expected = [(800, 1333, False, None), (800, 1333, True, None)] + [
        (s, 1333 if s < 800 else 3000, flip, r) for s, r in zip(scales, ranges) for flip in (False, True)]
    assert [(v.short_side, v.max_size, v.flip, v.size_range) for v in views] == expected
    assert views[0].data_config is config.data and views[1].data_config is config.data
    for view in views[2:]:
        canvas = tuple(view.data_config.canvas)
        assert canvas[0] % 32 == 0 and canvas[1] % 32 == 0
        assert canvas[0] - 32 < view.short_side <= canvas[0] and canvas[1] - 32 < view.max_size <= canvas[1]
        assert view.data_config.eval_min_size == view.short_side and view.data_config.max_size == view.max_size
    assert tuple(views[-1].data_config.canvas) == (1824, 3008) and config.data.aspect_ratio_buckets
    assert (config.eval.tta.merge, config.eval.tta.vote_threshold, config.eval.tta.soft_score_threshold,
            config.eval.tta.max_detections) == ("soft-vote", 0.66, 0.05, 1000)


def test_views_off_and_bad_settings():
    config = demo.get_config("tiny")  # canvas (128, 160), eval short side 128, long-side cap 160
    assert [(v.short_side, v.flip, v.data_config) for v in tta.views(config)] == [(128, False, config.data)]
    config.eval.tta.enabled = True
    config.eval.tta.min_sizes = (112, 144)
    config.eval.tta.max_size = 200
    views = tta.views(config)
    assert [(v.short_side, v.max_size, tuple(v.data_config.canvas)) for v in views] == [
        (128, 160, (128, 160)), (112, 160, (128, 160)), (144, 200, (160, 224))]
    config.eval.tta.size_ranges = ((0, 10),)
    with pytest.raises(ValueError, match=r"one \(low, high\) per short side"):
        tta.views(config)
    config.eval.tta.size_ranges = ((0, 10), (10, 5))
    with pytest.raises(ValueError, match="low < high"):
        tta.views(config)
    config.eval.tta.size_ranges = ()
    config.eval.tta.merge = "average"
    with pytest.raises(ValueError, match="merge"):
        tta.views(config)
    config.eval.tta.merge = "nms"
    config.eval.tta.min_sizes = (128, 0)
    with pytest.raises(ValueError, match="positive"):
        tta.views(config)
    config.eval.tta.min_sizes = (200,)  # (224, 224)
    config.data.aspect_ratio_buckets = True
    with pytest.raises(ValueError, match="square canvas"):
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


def _eval_config(merge, max_detections, nms_iou_threshold=0.5):
    config = demo.get_config("tiny").eval
    config.nms_iou_threshold = nms_iou_threshold
    config.tta.merge, config.tta.max_detections = merge, max_detections
    return config


def _plain_views(count):
    data = demo.get_config("tiny").data
    return [tta.View(128, 160, bool(i % 2), None, data) for i in range(count)]


def test_nms_merge_matches_a_loop_nms_over_all_views():
    rng = np.random.default_rng(0)
    views = [_random_view(rng, 5, 12) for _ in range(3)]
    merged = tta.merge_views(views, _plain_views(3), _eval_config("nms", 10), images_per_call=2)
    reference = _loop_merge(views, 0.5, 10)
    assert reference["valid"].sum(axis=1).min() >= 3  # several kept per image, some suppressed
    for key in ("boxes", "scores", "classes", "valid"):
        np.testing.assert_array_equal(merged[key], reference[key], err_msg=key)


def _official_remove_boxes(boxes, scale, size_range):
    """atss_core/engine/bbox_aug_vote.py remove_boxes on one image: inclusive pixels of the view."""
    keep = []
    for box in boxes.astype(np.float64) * scale - [0, 0, 1, 1]:
        area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
        keep.append(size_range[0] ** 2 < area < size_range[1] ** 2)
    return np.array(keep, bool)


def _official_vote_merge(views, view_list, eval_config):
    """Per image: each view's size filter, then the official vote over every view's candidates.

    Returns:
      per image, [K, 6] rows (x1, y1, x2, y2, score, class) best first.
    """
    result = []
    for image in range(len(views[0]["image_id"])):
        valid = [v["valid"][image] & (_official_remove_boxes(v["boxes"][image], v["scale"][image], view.size_range)
                                      if view.size_range else True) for v, view in zip(views, view_list)]
        candidates = {k: np.concatenate([v[k][image] for v in views]) for k in ("boxes", "scores", "classes")}
        result.append(official_merge(candidates["boxes"], candidates["scores"], candidates["classes"],
                                     np.concatenate(valid), eval_config.tta.vote_threshold,
                                     eval_config.tta.merge == "soft-vote", eval_config.tta.soft_score_threshold,
                                     eval_config.tta.max_detections))
    return result


def test_vote_merge_with_size_ranges_matches_the_official_loop():
    rng = np.random.default_rng(2)
    base = _random_view(rng, 5, 20)
    views = []
    for _ in range(4):  # the same objects, jittered in each view, so views vote together
        view = {**base, "boxes": base["boxes"] + rng.normal(0, 1.5, base["boxes"].shape).astype(np.float32),
                "scores": rng.uniform(0.05, 1, base["scores"].shape).astype(np.float32),
                "scale": rng.uniform(0.5, 2.0, 5), "valid": rng.uniform(size=base["valid"].shape) < 0.9}
        views.append(view)
    data = demo.get_config("tiny").data
    view_list = [tta.View(128, 160, False, None, data), tta.View(128, 160, True, None, data),
                 tta.View(96, 160, False, (20, 10000), data), tta.View(192, 240, True, (0, 40), data)]
    eval_config = _eval_config("soft-vote", 30)
    merged = tta.merge_views(views, view_list, eval_config, images_per_call=2)
    expected = _official_vote_merge(views, view_list, eval_config)
    for image, rows in enumerate(expected):
        assert len(rows) > 10
        count = min(len(rows), 30)
        assert merged["valid"][image].tolist() == [True] * count + [False] * (30 - count)
        got = np.concatenate([merged["boxes"][image], merged["scores"][image][:, None],
                              merged["classes"][image][:, None]], 1)[:count]
        np.testing.assert_allclose(got, rows[:count], rtol=1e-5, atol=1e-3)
    del views[2]["scale"]
    with pytest.raises(ValueError, match="scale"):
        tta.merge_views(views, view_list, eval_config)


def test_views_of_different_images_are_refused():
    rng = np.random.default_rng(1)
    first, second = _random_view(rng, 3, 4), _random_view(rng, 3, 4)
    second["image_id"] = second["image_id"][::-1]
    with pytest.raises(ValueError, match="different images"):
        tta.merge_views([first, second], _plain_views(2), _eval_config("nms", 4))


TRAINED_STEPS = 200


@pytest.fixture(scope="module")
def trained(synthetic_data_config, tmp_path_factory):
    """A tiny model trained for ``TRAINED_STEPS`` steps on the tiny synthetic set, and its plain evaluation.

    Evaluation reads the training images: what the checks need is a model whose views overlap in many
    detections for the merges to act on; held-out quality needs minutes more training than a test can take.
    """
    config = demo.get_config("tiny")
    config.data.data_dir = synthetic_data_config.data_dir
    config.data.eval_split = "train"
    config.train.num_steps = TRAINED_STEPS
    config.train.checkpoint_every = 1000
    config.train.log_every = 100
    config.optimizer.base_lr = 0.05
    config.optimizer.warmup_steps = 30
    config.optimizer.warmup_factor = 0.001
    config.optimizer.clip_grad_norm = 10.0
    config.eval.batch_per_device = 8
    workdir = tmp_path_factory.mktemp("tta_train")
    summary = train.train_and_evaluate(config, str(workdir))
    detections = json.loads((workdir / "eval" / f"step_{TRAINED_STEPS}" / "detections_host0.json").read_text())
    return config, workdir, summary, detections


def _evaluate_with_tta(trained, **tta_settings):
    config, workdir, _, _ = trained
    config = config.copy_and_resolve_references()
    config.eval.tta.update(enabled=True, **tta_settings)
    summary = evaluator.evaluate_checkpoint(config, str(workdir))
    detections = json.loads((workdir / "eval" / f"step_{TRAINED_STEPS}" / "detections_host0.json").read_text())
    return config, summary, detections


@pytest.mark.e2e
def test_the_plain_view_alone_reproduces_the_plain_evaluation_exactly(trained):
    _, _, plain_summary, plain_detections = trained
    _, summary, detections = _evaluate_with_tta(trained, merge="nms", max_detections=100)
    assert len(plain_detections) > 100
    assert detections == plain_detections
    assert summary["metrics"] == plain_summary["metrics"]


@pytest.mark.e2e
def test_official_style_views_give_the_official_vote_of_the_separate_views(trained, monkeypatch):
    """The plain view, two scales and every mirror, size ranges and soft voting: the evaluation's detections are
    the official loop's merge of the views it evaluated, whatever that does to AP (on a model trained this briefly it
    may lower it). Each view read its own short side, cap and mirroring."""
    recorded = []
    predict = evaluator.Evaluator.predict

    def recording_predict(self, variables, view, num_images_to_draw=0):
        result = predict(self, variables, view, num_images_to_draw)
        recorded.append((view, result[1], result[0].category_ids))
        return result

    monkeypatch.setattr(evaluator.Evaluator, "predict", recording_predict)
    config, _, detections = _evaluate_with_tta(
        trained, flip=True, min_sizes=(112, 144), max_size=192, scale_flip=True, size_ranges=((0, 48), (16, 10000)),
        merge="soft-vote", max_detections=600)  # 6 views x 100: no cut (tests/test_box_voting.py tests the cut)
    view_list, views = [view for view, _, _ in recorded], [predictions for _, predictions, _ in recorded]
    assert [(v.short_side, v.max_size, v.flip) for v in view_list] == [
        (128, 160, False), (128, 160, True), (112, 160, False), (112, 160, True), (144, 192, False), (144, 192, True)]
    for view, predictions, _ in recorded:
        height, width = predictions["original_size"].T.astype(np.float64)
        canvas = np.array(view.data_config.canvas, np.float64)  # no buckets: portrait images shrink to fit
        expected_scale = np.minimum.reduce([view.short_side / np.minimum(height, width),
                                            view.max_size / np.maximum(height, width),
                                            canvas[0] / height, canvas[1] / width])
        np.testing.assert_allclose(predictions["scale"], expected_scale, rtol=1e-6)
    rows = _official_vote_merge(views, view_list, config.eval)
    padded = max(len(r) for r in rows)
    assert 100 < sum(len(r) for r in rows) and padded <= 600
    stack = np.zeros((len(rows), padded, 6))
    for image, r in enumerate(rows):
        stack[image, :len(r)] = r
    valid = np.arange(padded)[None] < np.array([len(r) for r in rows])[:, None]
    expected = coco_eval.detections_to_coco(views[0]["image_id"], stack[..., :4], stack[..., 4],
                                            stack[..., 5].astype(int), valid, views[0]["original_size"],
                                            recorded[0][2])
    assert len(detections) == len(expected)
    # One to one within tolerance (scores may tie, so no fixed order pairs them).
    for image_id in views[0]["image_id"]:
        want = np.array([[d["category_id"], *d["bbox"], d["score"]] for d in expected if d["image_id"] == image_id]
                        ).reshape(-1, 6)
        used = np.zeros(len(want), bool)
        for d in (d for d in detections if d["image_id"] == image_id):
            close = ~used & np.all(np.isclose(want, [d["category_id"], *d["bbox"], d["score"]], rtol=1e-5, atol=1e-3),
                                   axis=1)
            assert close.any(), (image_id, d)
            used[np.argmax(close)] = True
        assert used.all()
