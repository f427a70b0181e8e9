r"""Prepares the configured dataset for the pipeline (ArrayRecord, random access): COCO through TFDS,
a COCO-format dataset from its annotation files and image folders, or the synthetic demo.

    python -m scripts.prepare_data --config=configs/atss_r50_fpn_1x_coco.py --config.data.data_dir=DIR
    python -m scripts.prepare_data --config=configs/base.py --config.data.name=coco_format \
        --config.data.coco_format.name=my_data \
        --config.data.coco_format.annotations.train=/data/my/train.json \
        --config.data.coco_format.images.train=/data/my/train_images \
        --config.data.coco_format.annotations.validation=/data/my/val.json \
        --config.data.coco_format.images.validation=/data/my/val_images
"""

from absl import app, flags, logging
from ml_collections import config_flags

from atss_jax.data import coco, datasets

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose data section names the dataset.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    builder = datasets.prepare(_CONFIG.value.data)
    splits = {name: split.num_examples for name, split in builder.info.splits.items()}
    logging.info("Prepared %s in %s: %s; category ids %s", builder.info.full_name, builder.data_dir, splits,
                 coco.category_ids(builder))


if __name__ == "__main__":
    app.run(main)
