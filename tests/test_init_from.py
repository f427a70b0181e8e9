"""Fine-tuning from a detector (config.init_from): every layer of the same shape loads, the class layer of another
number of classes starts at the focal prior, shared categories keep their rows by name, and training runs."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from atss_jax import init_from, train_step
from atss_jax.anchors import anchors_per_location
from atss_jax.data import pipeline
from atss_jax.models.detector import build_detector, init_detector
from configs import demo
from scripts.import_checkpoint import write_workdir
from tests.support import hangs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_workdir(data_config, directory, names: tuple[str, ...]) -> tuple[str, dict]:
    """A detector workdir of the tiny config with random variables (every leaf, not only the initialised
    ones, so each layer differs from a fresh initialisation) and categories ``names``."""
    config = demo.get_config("tiny")
    config.data = data_config
    config.model.num_classes = len(names)
    model = build_detector(config.model, anchors_per_location(config.anchors))
    variables = jax.device_get(init_detector(model, config.model, jax.random.key(7), tuple(config.data.canvas)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: 0.05 * rng.standard_normal(x.shape).astype(np.float32), variables)
    write_workdir(str(directory), config, variables, tuple(range(1, len(names) + 1)), names)
    return str(directory), variables


def fine_tune_config(data_config, init_from: str, num_classes: int):
    config = demo.get_config("tiny")
    config.data = data_config
    config.model.num_classes = num_classes
    config.init_from = init_from
    return config


def _flat(variables):
    return traverse_util.flatten_dict(jax.device_get(variables))


@pytest.mark.e2e
def test_every_layer_of_the_same_shape_loads_and_the_class_layer_starts_at_the_prior(synthetic_data_config,
                                                                                     tmp_path):
    """Through create_training (the hook): a 3-class detector from a 5-class one."""
    source, source_variables = source_workdir(synthetic_data_config, tmp_path / "source", tuple("abcde"))
    config = fine_tune_config(synthetic_data_config, source, num_classes=3)
    state = train_step.create_training(config).state
    loaded = _flat({"params": state.params, **state.model_state})
    trained = _flat(source_variables)
    assert set(loaded) == set(trained)
    prior = -math.log((1 - config.model.head.prior_prob) / config.model.head.prior_prob)
    for path, value in loaded.items():
        if path[:3] == ("params", "head", "cls_logits"):
            assert value.shape[-1] == 3 and trained[path].shape[-1] == 5
            if path[-1] == "bias":
                np.testing.assert_allclose(value, np.full(3, prior, np.float32), rtol=1e-6)
            else:
                assert np.std(value) < 0.02  # N(0, 0.01) afresh, not the source's N(0, 0.05)
        else:
            np.testing.assert_array_equal(value, trained[path], err_msg="/".join(path))


def test_class_rows_are_mapped_by_name(synthetic_data_config, tmp_path):
    names = pipeline.categories(synthetic_data_config).names  # the 4 synthetic classes, this config's labels
    # The source knows three of them, in another order, and one class this dataset lacks.
    source_names = (names[2], "unicorn", names[0], names[3], "dragon")
    source, source_variables = source_workdir(synthetic_data_config, tmp_path / "source", source_names)
    config = fine_tune_config(synthetic_data_config, source, num_classes=4)
    config.init_from_class_map = True
    model = build_detector(config.model, anchors_per_location(config.anchors))
    fresh = jax.device_get(init_detector(model, config.model, jax.random.key(0), tuple(config.data.canvas)))
    loaded_variables = init_from.load_initial_variables(config, fresh)
    trained = source_variables["params"]["head"]["cls_logits"]
    for leaf in ("kernel", "bias"):
        loaded = np.asarray(loaded_variables["params"]["head"]["cls_logits"][leaf])
        expected = np.array(fresh["params"]["head"]["cls_logits"][leaf])
        for target, name in enumerate(names):  # a plain loop over (class, source class) pairs
            for source_index, source_name in enumerate(source_names):
                if source_name == name:
                    expected[..., target] = trained[leaf][..., source_index]
        np.testing.assert_array_equal(loaded, expected)
        assert not np.array_equal(loaded[..., 1], trained[leaf][..., 1])  # names[1] is not in the source


@pytest.mark.e2e
def test_compare_finetune_writes_its_table(synthetic_data_config, tmp_path):
    shapes = ("rectangle", "ellipse", "triangle", "cross")
    source, _ = source_workdir(synthetic_data_config, tmp_path / "source", shapes)
    command = [sys.executable, "-m", "scripts.compare_finetune", f"--source={source}", f"--root={tmp_path / 'cmp'}",
               "--steps=1", "--num_train=8", "--num_validation=4", "--classes=triangle,rectangle",
               "--config.optimizer.base_lr=0.001"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=hangs.SUBPROCESS_S)
    assert result.returncode == 0, result.stderr[-3000:]
    # The fine-tunings ran to the end, loading the source's layers (its 4 classes in a 2-class head).
    assert result.stderr.count(f"Initialised from {source}") == 2
    assert all((tmp_path / "cmp" / run / "finished.json").exists() for run in ("scratch", "init_from", "class_map"))
    table = (tmp_path / "cmp" / "compare_finetune.md").read_text()
    assert all(f"| {run} |" in table for run in ("scratch", "init_from", "class_map"))
    configs = {run: json.loads((tmp_path / "cmp" / run / "config.json").read_text())
               for run in ("scratch", "class_map")}
    assert configs["scratch"]["init_from"] == "" and configs["class_map"]["init_from"] == source
    assert configs["class_map"]["optimizer"]["base_lr"] == 0.001 and configs["class_map"]["model"]["num_classes"] == 2
    annotations = json.loads((tmp_path / "cmp" / "data" / "finetune_triangle_rectangle_8_1" / "annotations" /
                              "instances_train.json").read_text())
    assert [c["name"] for c in annotations["categories"]] == ["triangle", "rectangle"]
    assert {a["category_id"] for a in annotations["annotations"]} <= {1, 2}
