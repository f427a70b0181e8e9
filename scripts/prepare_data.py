r"""Prepares the configured dataset for the pipeline (ArrayRecord, random access): COCO through TFDS,
a COCO-format dataset from its annotation files and image folders, or the synthetic demo.

    python -m scripts.prepare_data --config=configs/atss_r50_fpn_1x_coco.py --config.data.data_dir=DIR \
        [--download_dir=/mnt/disk/coco_zips]
    python -m scripts.prepare_data --config=configs/base.py --config.data.name=coco_format \
        --config.data.coco_format.name=my_data \
        --config.data.coco_format.annotations.train=/data/my/train.json \
        --config.data.coco_format.images.train=/data/my/train_images \
        --config.data.coco_format.annotations.validation=/data/my/val.json \
        --config.data.coco_format.images.validation=/data/my/val_images

A COCO-format dataset has every image decoded: undecodable images, and images whose size differs from their
JSON entry, are an error naming each file (--skip_bad_images leaves the undecodable ones out). The box count of
every image is recorded and compared with config.data.max_boxes.
"""

from absl import flags, logging
from ml_collections import config_flags

from atss_jax import cli
from atss_jax.data import coco, coco_format, datasets, splits

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose data section names the dataset.")
_DOWNLOAD_DIR = flags.DEFINE_string(
    "download_dir", None, "COCO through TFDS: fetch its archives into this local folder first, with downloads that "
    "resume where an interrupted run stopped (rerun the same command), and prepare from them.")
_SKIP_BAD_IMAGES = flags.DEFINE_bool(
    "skip_bad_images", False, "COCO-format datasets: leave out images that cannot be decoded (and their "
    "annotations, also in the evaluation ground truth) instead of stopping with the list of them.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    data_config = _CONFIG.value.data
    builder = datasets.prepare(data_config, skip_bad_images=_SKIP_BAD_IMAGES.value, download_dir=_DOWNLOAD_DIR.value)
    sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    logging.info("Prepared %s in %s: %s; category ids %s", builder.info.full_name, builder.data_dir, sizes,
                 coco.category_ids(builder))
    for name, skipped in coco_format.skipped_images(builder).items():
        if skipped:
            logging.warning("Split %r: %d undecodable images were left out (--skip_bad_images): %s", name,
                            len(skipped), ", ".join(s["file_name"] for s in skipped))
    for name in builder.info.splits:
        counts = splits.Split(builder, name).box_counts()
        if counts is not None and counts.size and counts.max() > data_config.max_boxes:
            logging.warning("Split %r: up to %d boxes in one image, more than config.data.max_boxes=%d: training "
                            "and evaluation with this config will stop at start-up; raise it.", name,
                            counts.max(), data_config.max_boxes)


if __name__ == "__main__":
    cli.run(main, "prepare_data")
