r"""Sweeps ATSS's k: trains one config once per k, collects each run's final AP into a table, a JSON and
a PNG plot of AP vs k.

    python -m scripts.sweep_k --config=configs/demo.py --root=/tmp/sweep --ks=3,5,7,9,11,13   # runs here, in turn
    python -m scripts.sweep_k --config=configs/atss_r50_fpn_1x_coco.py --root=gs://b/sweep --print_commands
    python -m scripts.sweep_k --config=... --root=gs://b/sweep --collect_only                   # after the cluster ran

Other `--config.*` flags are passed on to every run.
"""

import json
import os
import shlex
import subprocess
import sys

import matplotlib
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from atss_jax import workdirs

matplotlib.use("Agg")
from matplotlib import pyplot

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_ROOT = flags.DEFINE_string("root", None, "One workdir per k is made under it: <root>/k<k>.")
_KS = flags.DEFINE_list("ks", ["3", "5", "7", "9", "11", "13", "15"], "Values of k.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one training command per k (for a cluster) and stop.")
_COLLECT = flags.DEFINE_bool("collect_only", False, "Only collect the metrics of finished runs.")
flags.mark_flags_as_required(["config", "root"])


def _config_file() -> str:
    return config_flags.get_config_filename(flags.FLAGS["config"])


def command(k: int, passthrough: list[str]) -> list[str]:
    return [sys.executable, "-m", "atss_jax.main", f"--config={_config_file()}",
            f"--workdir={run_dir(k)}", f"--config.assigner.topk={k}", *passthrough]


def run_dir(k: int) -> epath.Path:
    return epath.Path(_ROOT.value) / f"k{k}"


def collect(ks: list[int]) -> dict[int, dict]:
    """The final metrics of every finished run (a run's intermediate metrics.json does not count)."""
    results = {}
    for k in ks:
        if (done := workdirs.finished(run_dir(k))) is not None:
            results[k] = done["metrics"]
    return results


def main(argv):
    del argv
    ks = [int(k) for k in _KS.value]
    passthrough = [a for a in sys.argv[1:] if a.startswith("--config.") and not a.startswith("--config.assigner.topk")]
    if _PRINT.value:
        for k in ks:
            print(shlex.join(command(k, passthrough)))
        return
    if not _COLLECT.value:
        for k in ks:
            # A finished run is skipped; an unfinished one resumes from its latest checkpoint.
            if workdirs.finished(run_dir(k)) is None:
                subprocess.run(command(k, passthrough), check=True, env={**os.environ})
    results = collect(ks)
    if not results:
        raise SystemExit(f"No finished runs under {_ROOT.value}.")
    lines = ["| k | AP | AP50 | AP75 | APs | APm | APl |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | " + " | ".join(f"{100 * m[n]:.1f}" for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + " |"
              for k, m in sorted(results.items())]
    table = "\n".join(lines)
    print(table)
    root = epath.Path(_ROOT.value)
    (root / "sweep_k.md").write_text(table + "\n")
    (root / "sweep_k.json").write_text(json.dumps({str(k): m for k, m in results.items()}, indent=1))
    figure, axis = pyplot.subplots(figsize=(5, 3.5))
    ordered = sorted(results)
    axis.plot(ordered, [100 * results[k]["AP"] for k in ordered], marker="o")
    axis.set_xlabel("k (candidates per level)")
    axis.set_ylabel("box AP")
    axis.set_title(epath.Path(_config_file()).name)
    axis.grid(alpha=0.3)
    with (root / "sweep_k.png").open("wb") as f:
        figure.savefig(f, dpi=120, bbox_inches="tight")
    print(f"Wrote {root / 'sweep_k.md'}, sweep_k.json, sweep_k.png")


if __name__ == "__main__":
    app.run(main)
