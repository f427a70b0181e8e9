r"""From scratch against fine-tuned from a trained detector (``config.init_from``), on a small dataset of other
classes: one table (README "Model zoo, fine-tuning, export and serving").

    python -m atss_jax.main --config=configs/demo.py --workdir=/tmp/demo                 # the source detector
    python -m scripts.compare_finetune --source=/tmp/demo --root=/tmp/finetune

The target dataset is new to the source: synthetic shapes of another seed (``--seed``), ``--num_train``
training images, only the ``--classes`` (in that order, so the class layer's rows move), written as a
COCO-format dataset under ``<root>/data`` and prepared once. Three runs of the source's config on it, each
``--steps`` steps and evaluated on ``--num_validation`` images:
  scratch      a fresh initialisation (the source's config: from scratch for the demo);
  init_from    every layer of the source except the class layer, which has other classes (re-initialised
               at the focal prior);
  class_map    as init_from, with the class layer's rows of the classes both share by name kept.
Writes ``<root>/compare_finetune.{md,json}``; finished runs are collected, not trained again. Other
``--config.*`` flags override every run's config.
"""

from __future__ import annotations

import json
import sys

import ml_collections
from absl import app, flags
from etils import epath
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from atss_jax import cli, train, workdirs
from atss_jax.data import datasets, synthetic
from configs import base

# Defined so that --config.* overrides apply to the source's config (read from its workdir).
_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Default config; the runs use the "
                                          "source's own config.json, with the --config.* overrides.")
_SOURCE = flags.DEFINE_string("source", None, "A trained detector's workdir (a training's or an imported one).")
_ROOT = flags.DEFINE_string("root", None, "The target dataset and one workdir per run are made under it.")
_STEPS = flags.DEFINE_integer("steps", 250, "Training steps of every run.")
_CLASSES = flags.DEFINE_list("classes", ["triangle", "rectangle"], "The target's classes, a subset of the "
                             "synthetic shapes, in the target's label order.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 200, "Training images of the target.")
_NUM_VALIDATION = flags.DEFINE_integer("num_validation", 200, "Validation images of the target.")
_SEED = flags.DEFINE_integer("seed", 1, "Seed of the target's images (the demo's source uses 0).")
flags.mark_flags_as_required(["source", "root"])

RUNS = ("scratch", "init_from", "class_map")


def write_target(directory: epath.Path, classes: list[str], num_train: int, num_validation: int,
                 seed: int) -> dict[str, tuple[str, str]]:
    """The synthetic shapes of ``seed`` with only ``classes`` (ids 1.. in that order) as COCO-format files;
    split -> (annotation JSON, image folder). Images keep every shape: the others are unlabelled background."""
    unknown = sorted(set(classes) - set(synthetic.CLASSES))
    if unknown or not classes:
        raise app.UsageError(f"--classes must be a subset of {synthetic.CLASSES}; got {classes}")
    if not directory.exists():  # else written before: the runs are resumed or collected
        partial = directory.parent / f"{directory.name}.partial"
        shapes = base.get_config().data.synthetic
        shapes.update(dict(num_train=num_train, num_validation=num_validation, seed=seed))
        target_id = {synthetic.CLASSES.index(name) + 1: i + 1 for i, name in enumerate(classes)}
        for annotation_path, _ in synthetic.write_coco(partial, shapes).values():
            data = json.loads(epath.Path(annotation_path).read_text())
            data["categories"] = [{"id": i + 1, "name": name, "supercategory": "shape"}
                                  for i, name in enumerate(classes)]
            data["annotations"] = [{**a, "category_id": target_id[a["category_id"]]} for a in data["annotations"]
                                   if a["category_id"] in target_id]
            epath.Path(annotation_path).write_text(json.dumps(data))
        partial.rename(directory)
    return synthetic.source_paths(directory)


def run_config(source_config: ml_collections.ConfigDict, run: str, source: str, data_dir: str, dataset: str,
               paths: dict[str, tuple[str, str]], num_classes: int, steps: int) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(source_config.to_dict())
    config.data.name = "coco_format"
    config.data.data_dir = data_dir
    config.data.coco_format.name = dataset
    for split, (annotation_file, image_dir) in paths.items():
        config.data.coco_format.annotations[split] = annotation_file
        config.data.coco_format.images[split] = image_dir
    config.model.num_classes = num_classes
    config.train.num_steps = steps
    config.train.checkpoint_every = steps
    config.train.eval_every = 0
    config.init_from = "" if run == "scratch" else source
    config.init_from_class_map = run == "class_map"
    return config


def main(argv):
    del argv
    root = epath.Path(_ROOT.value)
    source_config = workdirs.read_config(_SOURCE.value)
    source_config = _overridden(source_config)
    dataset = f"finetune_{'_'.join(_CLASSES.value)}_{_NUM_TRAIN.value}_{_SEED.value}"
    data_dir = str(root / "tfds")
    paths = write_target(root / "data" / dataset, _CLASSES.value, _NUM_TRAIN.value, _NUM_VALIDATION.value,
                         _SEED.value)
    results = {}
    for run in RUNS:
        config = run_config(source_config, run, _SOURCE.value, data_dir, dataset, paths, len(_CLASSES.value),
                            _STEPS.value)
        datasets.prepare(config.data)
        workdir = root / run
        done = workdirs.finished(workdir)
        results[run] = done["metrics"] if done else train.train(config, workdir)["metrics"]
    lines = [f"| start | AP ({_STEPS.value} steps) | AP50 | AP75 |", "|---|---|---|---|"]
    lines += [f"| {run} | {100 * m['AP']:.1f} | {100 * m['AP50']:.1f} | {100 * m['AP75']:.1f} |"
              for run, m in results.items()]
    table = "\n".join(lines)
    print(table)
    (root / "compare_finetune.md").write_text(
        f"{table}\n\nTarget: {_NUM_TRAIN.value} images of {', '.join(_CLASSES.value)} (seed {_SEED.value}); source "
        f"{_SOURCE.value}.\n")
    (root / "compare_finetune.json").write_text(json.dumps({"runs": results, "argv": sys.argv[1:]}, indent=1))


def _overridden(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the command line's --config.* overrides (absl parsed them onto the default file's config)."""
    for argument in sys.argv[1:]:
        if argument.startswith("--config.") and "=" in argument:
            field = argument[len("--config."):].split("=", 1)[0]
            config_path.set_value(field, config, config_path.get_value(field, _CONFIG.value))
    return config


if __name__ == "__main__":
    cli.run(main, "compare_finetune")
