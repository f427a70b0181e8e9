r"""Exports a training checkpoint for inference: model variables only (optionally bfloat16) + the config.

    python -m scripts.export --config=configs/demo.py --workdir=/tmp/demo --export_dir=/tmp/demo_export [--bf16]
    python -m atss_jax.predict --export_dir=/tmp/demo_export image.jpg --out_dir=/tmp/predictions
"""

import jax
from absl import app, flags
from ml_collections import config_flags

from atss_jax import checkpoint, train
from atss_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config the checkpoint was trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Where to write the export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BF16 = flags.DEFINE_bool("bf16", False, "Store the parameters in bfloat16.")
flags.mark_flags_as_required(["config", "workdir", "export_dir"])


def export(config, workdir: str, export_dir: str, step: int | None = None, bf16: bool = False) -> None:
    *_, state = train.restore_training(config, workdir, step, require_checkpoint=True)
    split = pipeline.open_split(config.data, config.data.eval_split)
    names = tuple(split.builder.info.features["objects"]["label"].names)
    variables = jax.device_get({"params": state.params, **state.model_state})
    checkpoint.export_inference(export_dir, variables, config, split.category_ids, names,
                                parameter_dtype="bfloat16" if bf16 else "float32")


def main(argv):
    del argv
    export(_CONFIG.value, _WORKDIR.value, _EXPORT_DIR.value, _STEP.value, _BF16.value)


if __name__ == "__main__":
    app.run(main)
