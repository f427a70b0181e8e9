"""scripts/predict.py as a tool: folders and globs, distinct output names that never replace an input, a bad file
reported by name while the others are written, COCO results, batching over devices; `Detector` test-time
augmentation against the official vote merge."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from etils import epath
from pycocotools.coco import COCO

from atss_jax.serving import Detector
from scripts import predict
from tests.reference_tta import official_merge
from tests.support import cpu_flags, hangs
from tests.test_serving_artifact import random_images, tiny_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(image).numpy())


@pytest.fixture
def image_tree(tmp_path):
    """in/a/x.jpg (a PNG named .jpg), in/a/x.png, in/b/x.jpg, in/b/bad.jpg (not an image), in/b/notes.txt."""
    images = random_images([(96, 128), (120, 90), (64, 160)], seed=3)
    files = [tmp_path / "in" / name for name in ("a/x.jpg", "a/x.png", "b/x.jpg")]
    for path, image in zip(files, images):
        _write_png(path, image)
    (tmp_path / "in" / "b" / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "in" / "b" / "notes.txt").write_text("not an input")
    return tmp_path, files, images


def test_inputs_names_and_refusals(image_tree):
    tmp_path, files, _ = image_tree
    found = predict.expand_inputs([str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b" / "*.jpg"), str(files[0])])
    want = [files[0], files[1], tmp_path / "in" / "b" / "bad.jpg", files[2]]
    assert [str(p) for p in found] == [str(p.resolve()) for p in want]  # folders recursive, sorted; no repeats
    assert predict.output_names(found) == ["a/x.jpg", "a/x.png", "b/bad.jpg", "b/x.jpg"]
    with pytest.raises(predict.Refused, match=r"nothing\*\.png: no file matches.*missing\.jpg: no such file"):
        predict.expand_inputs([str(tmp_path / "nothing*.png"), str(tmp_path / "missing.jpg")])
    # Writing next to the inputs is fine until an output would replace one of them.
    predict.plan_outputs(found, epath.Path(tmp_path / "in"), draw=True)
    _write_png(tmp_path / "in" / "a" / "x.jpg.png", np.zeros((4, 4, 3), np.uint8))
    clash = predict.expand_inputs([str(tmp_path / "in")])
    with pytest.raises(predict.Refused, match=r"Refusing to write over input file\(s\): .*a/x\.jpg\.png"):
        predict.plan_outputs(clash, epath.Path(tmp_path / "in"), draw=True)
    predict.plan_outputs(clash, epath.Path(tmp_path / "in"), draw=False)


def test_what_an_earlier_run_wrote_into_the_out_dir_is_never_an_input(image_tree):
    tmp_path, files, _ = image_tree
    inputs = tmp_path / "in"
    out_dir = (inputs / "predictions").resolve()  # inside the input folder
    for name in ("a/x.jpg.png", "b/x.jpg.png", "detections.json"):  # an earlier run's outputs
        _write_png(out_dir / name, np.zeros((4, 4, 3), np.uint8))
    _write_png(out_dir / "extra.png", np.zeros((4, 4, 3), np.uint8))  # not named like an output: an input
    found = predict.expand_inputs([str(inputs)])
    kept = [str(f) for f in found if not predict.is_earlier_output(f, epath.Path(out_dir))]
    assert kept == sorted([str(f.resolve()) for f in files] + [str(inputs.resolve() / "b" / "bad.jpg"),
                                                               str(out_dir / "extra.png")])
    assert not predict.is_earlier_output(epath.Path(files[0].resolve()), epath.Path(out_dir))


@pytest.mark.e2e
@pytest.mark.parametrize("arguments, message", [
    (["in/a/x.jpg.png"], "Every input is a file an earlier run wrote into --out_dir"),
    (["nothing*.png"], "nothing*.png: no file matches"),
])
def test_a_refusal_is_one_line_without_the_flag_usage(image_tree, arguments, message):
    tmp_path, _, _ = image_tree
    _write_png(tmp_path / "in" / "a" / "x.jpg.png", np.zeros((4, 4, 3), np.uint8))  # an earlier run's picture
    result = subprocess.run(
        [sys.executable, "-m", "scripts.predict", "--export_dir=unused", f"--out_dir={tmp_path / 'in'}",
         *[str(tmp_path / a) for a in arguments]],
        cwd=ROOT, capture_output=True, text=True, timeout=hangs.SUBPROCESS_S)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("predict: ") and message in last, result.stderr[-2000:]
    assert "--export_dir" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_predict_command_line_streams_and_reports_a_bad_file(image_tree):
    tmp_path, _, images = image_tree
    export_dir = tiny_export(str(tmp_path / "export"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": cpu_flags.with_devices(4)}
    result = subprocess.run(
        [sys.executable, "-m", "scripts.predict", f"--export_dir={export_dir}", f"--out_dir={tmp_path / 'out'}",
         "--batch_per_device=1", str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b" / "*.jpg")],
        cwd=ROOT, capture_output=True, text=True, timeout=hangs.SUBPROCESS_S, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "cannot read" in result.stderr and "bad.jpg" in result.stderr
    out = tmp_path / "out"
    for name in ("a/x.jpg", "a/x.png", "b/x.jpg"):  # same stems, distinct outputs
        assert (out / f"{name}.png").exists()
    assert not (out / "b" / "bad.jpg.png").exists()
    records = json.loads((out / "detections.json").read_text())
    errors = {epath.Path(r["file"]).name: r["error"] for r in records if "error" in r}
    assert list(errors) == ["bad.jpg"] and errors["bad.jpg"].startswith("InvalidArgumentError")
    # Four devices, one image each, against one device's Detector on the same images.
    expected = dict(zip(["a/x.jpg", "a/x.png", "b/x.jpg"], Detector(export_dir, batch_size=2).predict_arrays(images)))
    coco = COCO(str(out / "coco_images.json"))
    results = coco.loadRes(str(out / "coco_results.json"))
    assert sorted(coco.imgs[i]["file_name"] for i in coco.getImgIds()) == sorted(expected)
    for image_id, image in coco.imgs.items():
        want = expected[image["file_name"]]
        got = results.loadAnns(results.getAnnIds(imgIds=[image_id]))
        assert (image["height"], image["width"]) == images[list(expected).index(image["file_name"])].shape[:2]
        assert len(got) == len(want["scores"]) > 0
        order = np.argsort([-a["score"] for a in got], kind="stable")
        np.testing.assert_allclose([got[i]["bbox"] for i in order],
                                   np.concatenate([want["boxes"][:, :2], want["boxes"][:, 2:] - want["boxes"][:, :2]],
                                                  1), atol=1e-3)
        np.testing.assert_allclose([got[i]["score"] for i in order], want["scores"], rtol=1e-5)
        assert [got[i]["category_id"] for i in order] == want["category_ids"].tolist()


def test_tta_merges_the_views_as_the_official_vote(tmp_path):
    def configure(config):
        config.eval.tta.flip = True
        config.eval.tta.merge = "vote"

    export_dir = tiny_export(str(tmp_path / "export"), configure)
    images = random_images([(96, 128), (70, 150)], seed=5)
    merged = Detector(export_dir, batch_size=2, use_tta=True).predict_arrays(images)
    plain = Detector(export_dir, batch_size=2)
    config = plain.config
    for image, got in zip(images, merged):
        width = image.shape[1]
        direct, = plain.predict_arrays([image])
        mirrored, = plain.predict_arrays([np.ascontiguousarray(image[:, ::-1])])
        unmirrored = np.stack([width - mirrored["boxes"][:, 2], mirrored["boxes"][:, 1],
                               width - mirrored["boxes"][:, 0], mirrored["boxes"][:, 3]], 1)
        boxes = np.concatenate([direct["boxes"], unmirrored])
        scores = np.concatenate([direct["scores"], mirrored["scores"]])
        classes = np.concatenate([direct["labels"], mirrored["labels"]])
        want = official_merge(boxes, scores, classes, np.ones(len(scores), bool), config.eval.tta.vote_threshold,
                              False, config.eval.tta.soft_score_threshold, config.eval.tta.max_detections)
        assert len(got["scores"]) == len(want) > 0
        np.testing.assert_allclose(got["scores"], want[:, 4], rtol=1e-5)
        np.testing.assert_allclose(got["boxes"], want[:, :4], atol=1e-3)
        np.testing.assert_array_equal(got["labels"], want[:, 5])
    with pytest.raises(ValueError, match="no flip and no min_sizes"):
        Detector(tiny_export(str(tmp_path / "plain")), use_tta=True)
