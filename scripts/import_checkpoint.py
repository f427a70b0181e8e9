r"""Imports a released ATSS checkpoint as a ready-to-evaluate workdir.

    python -m scripts.import_checkpoint atss_r50_fpn_1x_coco_20200209-985f7bd0.pth /tmp/atss_mmdet --format=mmdet
    python -m scripts.import_checkpoint ATSS_R_50_FPN_1x.pth /tmp/atss_official --format=official
    python -m atss_jax.main --mode=eval --workdir=/tmp/atss_mmdet

Writes the workdir's config.json (default: configs/atss_r50_fpn_1x_coco_mmdet.py for mmdetection's checkpoints,
configs/atss_r50_fpn_1x_coco.py:official for the official ones; --config=... and --config.x=y override), its
categories.json (COCO's 80 for a COCO config, else the config's dataset's) and the variables as checkpoint 0,
which evaluation, export and fine-tuning (config.init_from) restore. The file is read without running anything
from it (torch.load(weights_only=True)); every key must map onto the model and every variable must be filled.
"""

from __future__ import annotations

import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from atss_jax import checkpoint, cli, errors, workdirs
from atss_jax.models import mmdet_import, official_import, state_dict_import
from configs import atss_r50_fpn_1x_coco, atss_r50_fpn_1x_coco_mmdet

# COCO's 80 category names in id order (label order), as its annotation files name them.
COCO_CATEGORY_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
# --format -> (converter module, default config).
FORMATS = {"mmdet": (mmdet_import, atss_r50_fpn_1x_coco_mmdet.get_config),
           "official": (official_import, lambda: atss_r50_fpn_1x_coco.get_config("official"))}

_FORMAT = flags.DEFINE_enum("format", None, list(FORMATS), "mmdet: mmdetection's checkpoints (backbone.*, neck.*, "
                            "bbox_head.*); official: sfzhang15/ATSS's (module.backbone.body.*, module.rpn.head.*).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "The config of the imported model; default: the "
                                          "format's R-50 1x config.", lock_config=True)
flags.mark_flags_as_required(["format"])


def categories(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(ids, names) in label order: COCO's 80 for a COCO config (no dataset needed), else the config's dataset's."""
    if config.data.name == "coco/2017" and config.model.num_classes == len(COCO_CATEGORY_NAMES):
        from atss_jax.data.coco import COCO_CATEGORY_IDS

        return COCO_CATEGORY_IDS, COCO_CATEGORY_NAMES
    from atss_jax.data import pipeline

    found = pipeline.categories(config.data)
    if len(found.ids) != config.model.num_classes:
        raise errors.ConfigError(f"The config's dataset has {len(found.ids)} categories but config.model.num_classes="
                                 f"{config.model.num_classes}.")
    return found.ids, found.names


def import_checkpoint(source: str, workdir: str, checkpoint_format: str, config: ml_collections.ConfigDict) -> None:
    """Converts ``source`` (``checkpoint_format``: a key of ``FORMATS``) into ``workdir`` for ``config``."""
    if checkpoint_format not in FORMATS:
        raise errors.ConfigError(f"--format={checkpoint_format!r} is not one of {sorted(FORMATS)}")
    directory = checkpoint.checkpoint_dir(workdir)
    if directory.exists() and any(directory.iterdir()):
        raise errors.Refusal(f"{directory} already holds checkpoints: import into a new workdir.")
    state_dict = state_dict_import.load_checkpoint(source)
    category_ids, category_names = categories(config)
    variables = FORMATS[checkpoint_format][0].convert_state_dict(state_dict, config)
    write_workdir(workdir, config, variables, category_ids, category_names)


def write_workdir(workdir: str, config: ml_collections.ConfigDict, variables: dict, category_ids: tuple[int, ...],
                  category_names: tuple[str, ...]) -> None:
    """A workdir of ``variables`` (the model's collections) as checkpoint 0, with its config and categories:
    what evaluation (``checkpoint.restore_variables``), export and ``config.init_from`` read."""
    workdirs.write_config(workdir, config)
    workdirs.write_categories(workdir, category_ids, category_names)
    model_state = {name: tree for name, tree in variables.items() if name != "params"}
    manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir))
    manager.save(0, args=ocp.args.StandardSave({"params": variables["params"], "model_state": model_state}))
    manager.wait_until_finished()


def main(argv):
    if len(argv) != 3:
        raise app.UsageError("usage: python -m scripts.import_checkpoint SRC.pth WORKDIR --format=mmdet|official "
                             "[--config=...]")
    _, source, workdir = argv
    if "://" not in workdir:  # Orbax wants absolute local paths
        workdir = str(epath.Path(workdir).resolve())
    config = _CONFIG.value if _CONFIG.value is not None else FORMATS[_FORMAT.value][1]()
    import_checkpoint(source, workdir, _FORMAT.value, config)
    print(f"Imported {source} into {workdir}: python -m atss_jax.main --mode=eval --workdir={workdir}")


if __name__ == "__main__":
    cli.run(main, "import_checkpoint")
