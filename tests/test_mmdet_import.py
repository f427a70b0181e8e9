"""mmdetection 3.3.0's own ATSS R-50 (random weights, through scripts/mmdet_peer.py) imported with
mmdet_import: per-level outputs, decoded boxes and scores, and detections agree with mmdetection's on the same
images."""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mmengine")  # the test requirements (mmdetection itself only through scripts/mmdet_peer.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from atss_jax import boxes as box_lib  # noqa: E402
from atss_jax import inference, postprocess  # noqa: E402
from atss_jax.anchors import anchor_valid_mask, anchors_per_location, build_anchor_grid  # noqa: E402
from atss_jax.models import mmdet_import  # noqa: E402
from atss_jax.models.detector import build_detector, full_image_sizes  # noqa: E402
from configs import atss_r50_fpn_1x_coco_mmdet  # noqa: E402
from scripts import mmdet_peer  # noqa: E402

NUM_CLASSES = 3
CANVAS = (320, 384)
RTOL = 1e-4


@pytest.fixture(scope="module")
def peer_and_ours():
    """mmdetection's model with every weight and statistic random (mmdetection initialises BN statistics to
    0 and 1, scales to 1 and the classifier bias to the focal prior: each is perturbed so a wrong mapping shows),
    its state_dict converted, our model, and two RGB images."""
    torch.manual_seed(0)
    peer = mmdet_peer.build_model(mmdet_peer.atss_r50_config(num_classes=NUM_CLASSES)).eval()
    state = peer.state_dict()
    generator = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if key.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias", ".1.bias", "gn.bias")):
            value.copy_(0.1 * torch.randn(value.shape, generator=generator))
        elif key.endswith(("running_var", "gn.weight", "scale")):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        elif key.endswith(("atss_cls.bias", "atss_reg.bias", "atss_centerness.bias", "neck.fpn_convs.4.conv.bias")):
            value.copy_(torch.randn(value.shape, generator=generator))
    state_dict = {key: value.numpy() for key, value in state.items()}
    config = atss_r50_fpn_1x_coco_mmdet.get_config()
    config.model.num_classes = NUM_CLASSES
    variables = mmdet_import.convert_state_dict(state_dict, config)
    model = build_detector(config.model, anchors_per_location(config.anchors))
    images = np.random.default_rng(0).integers(0, 256, (2, *CANVAS, 3), dtype=np.uint8)
    return peer, config, model, variables, images


@pytest.fixture(scope="module")
def outputs(peer_and_ours):
    """(peer's per-level (cls, reg, centerness) [B, C, H, W] each, ours [B, A, *]) on the same images, mmdetection's
    input through its own data preprocessor (BGR files, bgr_to_rgb, its mean and std, padding to 32)."""
    peer, _, model, variables, images = peer_and_ours
    bgr = [torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1))) for image in images]
    with torch.no_grad():
        batch = peer.data_preprocessor({"inputs": bgr, "data_samples": None}, training=False)["inputs"]
        assert tuple(batch.shape[2:]) == CANVAS
        theirs = peer.bbox_head(peer.extract_feat(batch))
    ours = jax.jit(model.apply)(variables, jnp.asarray(images), full_image_sizes(2, CANVAS))
    return [[level.numpy() for level in output] for output in theirs], [np.asarray(x) for x in ours]


def _flatten(level: np.ndarray) -> np.ndarray:
    """mmdetection's ``[B, C, H, W]`` in our anchor order: ``[B, H * W, C]`` (one anchor per location)."""
    return level.transpose(0, 2, 3, 1).reshape(level.shape[0], -1, level.shape[1])


def _assert_relative(ours: np.ndarray, theirs: np.ndarray, what: str) -> float:
    """Max |ours - theirs| relative to theirs' largest magnitude, asserted below RTOL; returned for the record."""
    relative = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
    assert relative < RTOL, f"{what}: max relative difference {relative:.2e}"
    return relative


def test_per_level_outputs_agree(peer_and_ours, outputs):
    _, config, *_ = peer_and_ours
    theirs, (class_logits, box_regression, centerness) = outputs
    grid = build_anchor_grid(config.anchors, CANVAS)
    starts = np.cumsum((0, *grid.level_sizes))
    measured = {}
    for level, (start, end) in enumerate(itertools.pairwise(starts)):
        assert _flatten(theirs[0][level]).shape == class_logits[:, start:end].shape
        for name, ours, their in (("class logits", class_logits, theirs[0][level]),
                                  ("box regression", box_regression, theirs[1][level])):
            measured[f"{name} P{level + 3}"] = _assert_relative(ours[:, start:end], _flatten(their),
                                                                f"{name} P{level + 3}")
        measured[f"centre-ness P{level + 3}"] = _assert_relative(
            centerness[:, start:end], _flatten(theirs[2][level])[..., 0], f"centre-ness P{level + 3}")
    print("max relative differences to mmdetection:", {k: f"{v:.1e}" for k, v in measured.items()})


def test_decoded_boxes_and_scores_before_nms_agree(peer_and_ours, outputs):
    """Every anchor's decoded, clipped box (mmdetection's anchors and DeltaXYWHBBoxCoder) and score; then the
    candidates mmdetection keeps before NMS (score_thr, nms_pre per level) and after it."""
    peer, config, _, _, _ = peer_and_ours
    theirs, (class_logits, box_regression, centerness) = outputs
    head = peer.bbox_head
    sizes = [level.shape[2:] for level in theirs[0]]
    priors = torch.cat(head.prior_generator.grid_priors(sizes, device="cpu"))
    grid = build_anchor_grid(config.anchors, CANVAS)
    np.testing.assert_allclose(grid.boxes, priors.numpy(), atol=1e-4)
    anchors = jnp.asarray(grid.boxes)
    decoded = box_lib.clip_boxes(box_lib.decode_regression(
        "box", anchors, jnp.asarray(grid.anchor_strides), jnp.asarray(box_regression), config.model.head.box_coder),
        jnp.asarray(CANVAS))
    scores = jax.nn.sigmoid(class_logits) * jax.nn.sigmoid(centerness)[..., None]
    for image in range(2):
        regression = torch.cat([level[image].permute(1, 2, 0).reshape(-1, 4) for level in
                                (torch.from_numpy(x) for x in theirs[1])])
        their_boxes = head.bbox_coder.decode(priors, regression, max_shape=CANVAS).numpy()
        np.testing.assert_allclose(decoded[image], their_boxes, rtol=RTOL, atol=RTOL * CANVAS[1])
        their_scores = np.concatenate([1 / (1 + np.exp(-_flatten(c[image:image + 1])[0])) / (
            1 + np.exp(-_flatten(t[image:image + 1])[0])) for c, t in zip(theirs[0], theirs[2])])
        np.testing.assert_allclose(scores[image], their_scores, rtol=RTOL, atol=1e-6)

    metas = [{"img_shape": CANVAS, "scale_factor": (1.0, 1.0)}] * 2
    tensors = [[torch.from_numpy(level) for level in output] for output in theirs]
    before_nms = head.predict_by_feat(*tensors, batch_img_metas=metas, rescale=False, with_nms=False)
    after_nms = head.predict_by_feat(*tensors, batch_img_metas=metas, rescale=False, with_nms=True)
    eval_config = config.eval
    for image in range(2):
        probs = jax.nn.sigmoid(class_logits[image])
        passes = probs > eval_config.score_threshold
        anchor_index, class_index = postprocess.level_topk(jnp.where(passes, probs, -1.0), grid.level_sizes,
                                                           eval_config.pre_nms_topk)
        kept = np.asarray(passes[anchor_index, class_index])
        ours_scores = np.asarray(scores[image][anchor_index, class_index])[kept]
        ours_labels = np.asarray(class_index)[kept]
        theirs_scores, theirs_labels = before_nms[image].scores.numpy(), before_nms[image].labels.numpy()
        assert len(ours_scores) == len(theirs_scores) > 1000
        for label in range(NUM_CLASSES):  # orders may differ within float noise: compare sorted values
            np.testing.assert_allclose(np.sort(ours_scores[ours_labels == label]),
                                       np.sort(theirs_scores[theirs_labels == label]), rtol=RTOL, atol=1e-6)

        detections = postprocess.select_detections(
            probs, jax.nn.sigmoid(centerness[image]), decoded[image],
            anchor_valid_mask(grid.centers, full_image_sizes(1, CANVAS))[0], jnp.asarray(CANVAS), jnp.float32(1.0),
            level_sizes=grid.level_sizes, score_threshold=eval_config.score_threshold,
            pre_nms_topk=eval_config.pre_nms_topk, iou_threshold=eval_config.nms_iou_threshold,
            max_detections=eval_config.max_detections, score_rule=eval_config.score_rule)
        final = after_nms[image]
        ours_valid = np.asarray(detections.valid)
        assert ours_valid.sum() == len(final.scores) == eval_config.max_detections
        np.testing.assert_allclose(np.asarray(detections.scores)[ours_valid], final.scores.numpy()[:100],
                                   rtol=RTOL, atol=1e-6)
        # Each of mmdetection's detections is one of ours: same class, score and box.
        ours_boxes, ours_scores = np.asarray(detections.boxes), np.asarray(detections.scores)
        ours_classes = np.asarray(detections.classes)
        for box, score, label in zip(final.bboxes.numpy(), final.scores.numpy(), final.labels.numpy()):
            match = (ours_classes == label) & (np.abs(ours_scores - score) < 1e-5)
            assert match.any() and np.abs(ours_boxes[match] - box).max(axis=1).min() < 1e-2, (box, score, label)


def _matched(ours: dict, box: np.ndarray, score: float, label: int) -> bool:
    """Whether one of our valid detections has mmdetection's class, score and box."""
    valid = np.asarray(ours["valid"][0])
    match = valid & (np.asarray(ours["classes"][0]) == label) & (np.abs(np.asarray(ours["scores"][0]) - score) < 1e-5)
    return bool(match.any()) and np.abs(np.asarray(ours["boxes"][0])[match] - box).max(axis=1).min() < 1e-2


def test_an_image_padded_to_32_detects_from_the_padding_as_mmdetection_does(peer_and_ours):
    """mmdetection evaluates one image at a time, padded to a multiple of 32, and its head keeps every anchor of
    that padded input. With the import config's eval.anchor_pad_divisor=32 our detections equal its detections;
    with 1 (anchors whose centre lies in the image alone) some of its detections are missing."""
    peer, config, model, variables, images = peer_and_ours
    assert config.eval.anchor_pad_divisor == 32
    size, padded = (250, 300), (256, 320)
    image = images[0][:size[0], :size[1]]
    bgr = torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)))
    with torch.no_grad():
        inputs = peer.data_preprocessor({"inputs": [bgr], "data_samples": None}, training=False)["inputs"]
        assert tuple(inputs.shape[2:]) == padded
        theirs = peer.bbox_head.predict_by_feat(*peer.bbox_head(peer.extract_feat(inputs)), batch_img_metas=[
            {"img_shape": size, "scale_factor": (1.0, 1.0)}], rescale=False, with_nms=True)[0]
    canvas = np.zeros((1, *padded, 3), np.uint8)
    canvas[0, :size[0], :size[1]] = image
    batch = {"image": jnp.asarray(canvas), "image_size": jnp.asarray([size], jnp.int32),
             "scale": jnp.ones(1, jnp.float32)}
    detections = {}
    for divisor in (32, 1):
        divided = config.copy_and_resolve_references()
        divided.eval.anchor_pad_divisor = divisor
        detections[divisor] = inference.eval_step(variables, batch, config=divided, model=model)
    ours = detections[32]
    assert int(np.asarray(ours["valid"][0]).sum()) == len(theirs.scores) == config.eval.max_detections
    theirs_detections = list(zip(theirs.bboxes.numpy(), theirs.scores.numpy(), theirs.labels.numpy()))
    assert all(_matched(ours, *detection) for detection in theirs_detections)
    assert not all(_matched(detections[1], *detection) for detection in theirs_detections)


def test_refuses_a_checkpoint_that_does_not_fit(peer_and_ours):
    peer, *_ = peer_and_ours
    state_dict = {key: value.numpy() for key, value in peer.state_dict().items()}
    del state_dict["neck.fpn_convs.4.conv.weight"]
    state_dict["bbox_head.extra.weight"] = np.zeros(3, np.float32)
    other = atss_r50_fpn_1x_coco_mmdet.get_config()  # 80 classes: the class layer's shape differs
    with pytest.raises(ValueError) as error:
        mmdet_import.convert_state_dict(state_dict, other)
    message = str(error.value)
    assert "missing neck.fpn_convs.4.conv.weight" in message
    assert "unused bbox_head.extra.weight" in message
    assert "bbox_head.atss_cls.weight: shape (3, 256, 3, 3)" in message


def test_box_coder_clamps_like_mmdetection(peer_and_ours):
    """Extreme deltas (boxes up to 1000/16 times larger or smaller than their anchor, and beyond): mmdetection's
    DeltaXYWHBBoxCoder clamps the log-size on both sides; the official coder only from above."""
    peer, *_ = peer_and_ours
    anchors = np.array([[8.0, 16.0, 72.0, 80.0]] * 6, np.float32)
    deltas = np.array([[0, 0, 0, 0], [1, -1, 3, -3], [0.5, 0.2, 30, 30], [0, 0, -30, -30], [0, 0, -20, 21],
                       [-2, 3, 20.6, -20.7]], np.float32)
    theirs = peer.bbox_head.bbox_coder.decode(torch.from_numpy(anchors), torch.from_numpy(deltas)).numpy()
    ours = box_lib.decode_regression("box", jnp.asarray(anchors), jnp.ones(6), jnp.asarray(deltas), "mmdetection")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    official = box_lib.decode_regression("box", jnp.asarray(anchors), jnp.ones(6), jnp.asarray(deltas))
    assert np.all(np.asarray(official[3, 2:] - official[3, :2]) < np.asarray(ours[3, 2:] - ours[3, :2]))
