"""Serving imports the model, pre/post-processing and the export restore only: no training code."""

import json
import os
import subprocess
import sys

from tests.support import hangs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Training-only packages and this project's training-side modules.
TRAINING_MODULES = ("optax", "clu", "tensorflow_datasets", "pycocotools", "faster_coco_eval", "atss_jax.train",
                    "atss_jax.train_step", "atss_jax.optim", "atss_jax.losses", "atss_jax.evaluator",
                    "atss_jax.coco_eval", "atss_jax.assigners", "atss_jax.data.pipeline", "atss_jax.data.coco")


def test_serving_imports_no_training_code():
    program = ("import json, sys; import atss_jax.serving, scripts.predict; "
               "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True,
                            timeout=hangs.SUBPROCESS_S)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert {"atss_jax.serving", "atss_jax.inference", "atss_jax.models.detector", "flax"} <= imported
    loaded = sorted(m for m in imported
                    if m in TRAINING_MODULES or m.startswith(tuple(f"{t}." for t in TRAINING_MODULES)))
    assert not loaded, f"serving imported training code: {loaded}"
