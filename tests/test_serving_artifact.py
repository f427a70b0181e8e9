"""The jax.export serving artifact: served in a fresh interpreter that cannot import this repository or flax, it
detects what `Detector` detects; its resize contract equals the TensorFlow transforms."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from etils import epath

from atss_jax import checkpoint, serving, serving_export
from atss_jax.anchors import anchors_per_location
from atss_jax.data import transforms
from atss_jax.models.detector import build_detector, init_detector
from configs import demo
from tests.support import hangs

CATEGORY_NAMES = ("circle", "square", "triangle", "star")


def tiny_export(directory: str, configure=None) -> str:
    """A randomly initialised tiny model exported for inference (keeping its low-score detections, so an
    untrained model has some to compare); `configure(config)` edits the config first."""
    config = demo.get_config("tiny")
    config.eval.score_threshold = 0.0
    config.eval.max_detections = 20
    if configure is not None:
        configure(config)
    model = build_detector(config.model, anchors_per_location(config.anchors))
    variables = init_detector(model, config.model, jax.random.key(0), tuple(config.data.canvas))
    checkpoint.export_inference(directory, jax.device_get(variables), config, (1, 2, 3, 5), CATEGORY_NAMES)
    return directory


def random_images(sizes, seed=0) -> list[np.ndarray]:
    """Smooth random images (noise blurred by upsampling): features vary, so do the detections."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
        images.append(np.ascontiguousarray(np.kron(coarse, np.ones((8, 8, 1), np.uint8))[:height, :width]))
    return images


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    directory = tiny_export(str(tmp_path_factory.mktemp("export")))
    serving_export.export_serving(directory, platforms=("cpu", "cuda"))
    return directory


# Runs before anything else in the fresh interpreter: this repository, flax and TensorFlow cannot be imported.
BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("atss_jax", "configs", "scripts", "tests", "flax", "tensorflow", "orbax"):
            raise ImportError(f"{name} is blocked: serving must need jax alone")
sys.meta_path.insert(0, Blocker())
"""

# The README's "Serve without this repository" snippet (the resize with jax alone), plus the artifact's signature.
SERVE = BLOCKER + """
import json, pathlib, jax, jax.numpy as jnp, numpy as np
export_dir = pathlib.Path(sys.argv[1])
contract = json.loads((export_dir / "serving.json").read_text())
artifact = contract["artifacts"][0]
exported = jax.export.deserialize(bytearray((export_dir / artifact["file"]).read_bytes()))
inputs = np.load(sys.argv[2])
out = exported.call(inputs["image"], inputs["original_size"])
r, (H, W) = contract["resize"], artifact["canvas"]
resized = []
for image, (h, w) in zip(inputs["raw"], inputs["original_size"]):
    f = np.float32
    scale = min(f(r["short_side"]) / f(min(h, w)), f(r["max_size"]) / f(max(h, w)), f(H) / f(h), f(W) / f(w))
    size = np.clip(np.round(np.array([h, w], f) * f(scale)).astype(int), 1, [H, W])
    small = jax.image.resize(jnp.asarray(image[:h, :w], f), (*size, 3), "bilinear", antialias=False)
    resized.append(np.pad(np.asarray(small + 0.5).astype(np.uint8), ((0, H - size[0]), (0, W - size[1]), (0, 0))))
assert not any(m.split(".")[0] in ("atss_jax", "flax", "tensorflow") for m in sys.modules)
signature = {"in": [[str(a.dtype), [str(d) for d in a.shape]] for a in exported.in_avals],
             "out": {k: [str(a.dtype), [str(d) for d in a.shape]]
                     for k, a in jax.tree.unflatten(exported.out_tree, exported.out_avals).items()}}
np.savez(sys.argv[3], resized=np.stack(resized), **{k: np.asarray(v) for k, v in out.items()})
import sysconfig
installed = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
loaded = sorted({name.split(".")[0] for name, module in list(sys.modules.items())
                 if any(str(getattr(module, "__file__", None) or "").startswith(p) for p in installed)})
print(json.dumps({**signature, "installed_modules": loaded}))
"""


@pytest.mark.e2e
def test_artifact_detects_as_the_detector_with_jax_alone(export_dir, tmp_path):
    images = random_images([(96, 128), (150, 100), (128, 160), (40, 300), (64, 64)])
    detector = serving.Detector(export_dir, batch_size=2)
    expected = detector.predict_arrays(images)
    canvas = detector.canvases[0]
    raw = np.zeros((len(images), 150, 300, 3), np.uint8)  # the raw images travel padded in one array
    for i, image in enumerate(images):
        raw[i, :image.shape[0], :image.shape[1]] = image
    tf_canvases = np.stack([detector.preprocess(image, canvas) for image in images])
    np.savez(tmp_path / "inputs.npz", image=tf_canvases, original_size=np.array([im.shape[:2] for im in images],
                                                                                np.int32), raw=raw)
    # Five images through an artifact exported with a symbolic batch (the Detector ran batches of two).
    result = subprocess.run([sys.executable, "-c", SERVE, export_dir, str(tmp_path / "inputs.npz"),
                             str(tmp_path / "out.npz")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=hangs.SUBPROCESS_S,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    signature = json.loads(result.stdout.strip().splitlines()[-1])
    out = np.load(tmp_path / "out.npz")
    contract = json.loads((epath.Path(export_dir) / serving_export.CONTRACT_FILE).read_text())
    dims = {"b": "b", "H": str(canvas[0]), "W": str(canvas[1])}
    assert signature["in"] == [[spec["dtype"], [dims.get(d, str(d)) for d in spec["shape"]]]
                               for spec in contract["inputs"]]
    assert signature["out"] == {spec["name"]: [spec["dtype"], [dims.get(d, str(d)) for d in spec["shape"]]]
                                for spec in contract["outputs"]}
    # The contract names what serving needs beyond jax, at the versions exported with: flatbuffers, which
    # jax.export reads the file with (the snippet loaded it), among them.
    assert "flatbuffers" in signature["installed_modules"] and "flatbuffers" in contract["requires"]
    assert contract["requires"]["jax"] == jax.__version__ and contract["requires"]["jaxlib"] == jax.lib.__version__
    for i, want in enumerate(expected):
        n = int(out["num_detections"][i])
        assert n == len(want["scores"]) > 0
        np.testing.assert_allclose(out["boxes"][i, :n], want["boxes"], atol=1e-3)
        np.testing.assert_allclose(out["scores"][i, :n], want["scores"], rtol=1e-5)
        np.testing.assert_array_equal(out["classes"][i, :n], want["labels"])
        assert not out["scores"][i, n:].any()
    # The snippet's resize with jax alone is TensorFlow's to one intensity level.
    assert np.abs(out["resized"].astype(int) - tf_canvases.astype(int)).max() <= 1


def test_fixed_batch_sizes_write_one_artifact_each(tmp_path):
    directory = tiny_export(str(tmp_path / "export"))
    contract = serving_export.export_serving(directory, batch_sizes=(1, 3), platforms=("cpu",))
    assert [a["batch"] for a in contract["artifacts"]] == [1, 3]
    for artifact in contract["artifacts"]:
        exported = jax.export.deserialize(bytearray((tmp_path / "export" / artifact["file"]).read_bytes()))
        assert exported.in_avals[0].shape == (artifact["batch"], 128, 160, 3)
        assert exported.platforms == ("cpu",)
    with pytest.raises(ValueError, match="positive"):
        serving_export.export_serving(directory, batch_sizes=(0,))


def test_resize_geometry_equals_the_tensorflow_transforms():
    rng = np.random.default_rng(1)
    sizes = np.concatenate([rng.integers(1, 400, (150, 2)), [[1, 1], [1, 399], [224, 336], [336, 224], [300, 300]]])
    canvas, short_side, max_size = (256, 352), 224, 336
    scale, image_size = serving.resize_geometry(sizes.astype(np.int32), short_side, max_size, canvas)
    for (height, width), got_scale, got_size in zip(sizes, np.asarray(scale), np.asarray(image_size)):
        want_scale = transforms.resize_scale(tf.constant([height, width]), tf.constant(short_side), max_size, canvas)
        _, _, want_size = transforms.resize_and_pad(tf.zeros([height, width, 3], tf.uint8), tf.zeros([0, 4]),
                                                    want_scale, canvas)
        assert got_scale == want_scale.numpy()
        np.testing.assert_array_equal(got_size, want_size.numpy())
