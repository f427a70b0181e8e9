r"""Exports a training checkpoint for inference: model variables only (optionally bfloat16) + the config.

    python -m scripts.export --workdir=/tmp/demo --export_dir=/tmp/demo_export [--step=N] [--bf16]
    python -m scripts.predict --export_dir=/tmp/demo_export image.jpg --out_dir=/tmp/predictions

Needs only the workdir: the config and categories the run wrote there (no dataset, no pretrained
weights, no optimiser state). Also writes the serving artifact (atss_jax/serving_export.py: the whole
inference function serialised with jax.export, served with jax alone) and its contract, serving.json:
a symbolic batch unless --serving_batch_sizes=1,8; --serving_platforms= (empty) leaves it out.
"""

from absl import flags
from ml_collections import config_flags

from atss_jax import cli, serving_export, workdirs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Default: the workdir's config.json (the config the run "
                                          "was trained with).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Where to write the export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BF16 = flags.DEFINE_bool("bf16", False, "Store the parameters in bfloat16.")
_SERVING_BATCH_SIZES = flags.DEFINE_list("serving_batch_sizes", [], "Fixed batch sizes of the serving artifact "
                                         "(one file each); empty: one artifact with a symbolic batch.")
_SERVING_PLATFORMS = flags.DEFINE_list("serving_platforms", list(serving_export.DEFAULT_PLATFORMS),
                                       "Platforms the serving artifact runs on; empty: no serving artifact.")
flags.mark_flags_as_required(["workdir", "export_dir"])


def main(argv):
    del argv
    config = _CONFIG.value if _CONFIG.value is not None else workdirs.read_config(_WORKDIR.value)
    serving_export.export_workdir(config, _WORKDIR.value, _EXPORT_DIR.value, _STEP.value, _BF16.value,
                                  tuple(int(b) for b in _SERVING_BATCH_SIZES.value), tuple(_SERVING_PLATFORMS.value))


if __name__ == "__main__":
    cli.run(main, "export")
