r"""Sweeps ATSS's k: trains one config once per k, collects each run's final AP into a table, a JSON and
a PNG plot of AP vs k (scripts/sweep.py over ``assigner.topk``; that script sweeps any field).

    python -m scripts.sweep_k --config=configs/demo.py --root=/tmp/sweep --ks=3,5,7,9,11,13   # runs here, in turn
    python -m scripts.sweep_k --config=configs/atss_r50_fpn_1x_coco.py --root=gs://b/sweep --print_commands
    python -m scripts.sweep_k --config=... --root=gs://b/sweep --collect_only                   # after the cluster ran

Other `--config.*` flags are passed on to every run.
"""

from absl import flags
from ml_collections import config_flags

from atss_jax import cli
from scripts import sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_ROOT = flags.DEFINE_string("root", None, "One workdir per k is made under it: <root>/k<k>.")
_KS = flags.DEFINE_list("ks", ["3", "5", "7", "9", "11", "13", "15"], "Values of k.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one training command per k (for a cluster) and stop.")
_COLLECT = flags.DEFINE_bool("collect_only", False, "Only collect the metrics of finished runs.")
flags.mark_flags_as_required(["config", "root"])

FIELD = "assigner.topk"


def main(argv):
    del argv
    sweep.sweep(config_flags.get_config_filename(flags.FLAGS["config"]), _ROOT.value, FIELD,
                [str(int(k)) for k in _KS.value], sweep.passthrough_flags(FIELD), print_commands=_PRINT.value,
                collect_only=_COLLECT.value, name=lambda field, k: f"k{k}", label="k", stem="sweep_k")


if __name__ == "__main__":
    cli.run(main, "sweep_k")
