r"""Sweeps any config field: trains one config once per value, collects each run's final AP into a table, a JSON
and a PNG plot of AP against the value.

    python -m scripts.sweep --config=configs/demo.py --root=/tmp/sweep --field=assigner.topk --values=5,9,13
    python -m scripts.sweep --config=configs/demo_assigners.py --root=/tmp/s --field=assigner.name --values=atss,tal
    python -m scripts.sweep --config=... --root=gs://b/sweep --field=... --values=... --print_commands  # a cluster
    python -m scripts.sweep --config=... --root=gs://b/sweep --field=... --values=... --collect_only    # after it ran

Runs go to ``<root>/<last field name><value>``, the results to ``<root>/sweep_<last field name>.{md,json,png}``.
``--field=variant`` sweeps the config file's variants instead (``--config=<file>:<value>``), e.g. the assigners of
configs/demo_assigners.py.
Other ``--config.*`` flags are passed on to every run. scripts/sweep_k.py is this sweep over ``assigner.topk``.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

import matplotlib
from absl import flags
from etils import epath
from ml_collections import config_flags

from atss_jax import workdirs

matplotlib.use("Agg")
from matplotlib import pyplot

from atss_jax import cli, errors

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
VARIANT = "variant"  # the --field that sweeps the config file's variants


def run_name(field: str, value: str) -> str:
    """``<root>/<run_name>``: the field's last name and the value, e.g. ``topk9``; other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{field.split('.')[-1]}{value}")


def command(config_file: str, workdir: epath.Path, field: str, value: str, passthrough: Sequence[str]) -> list[str]:
    setting = [f"--config={config_file}:{value}"] if field == VARIANT else [f"--config={config_file}",
                                                                              f"--config.{field}={value}"]
    return [sys.executable, "-m", "atss_jax.main", *setting, f"--workdir={workdir}", *passthrough]


def sweep(config_file: str, root: str, field: str, values: Sequence[str], passthrough: Sequence[str], *,
          print_commands: bool = False, collect_only: bool = False, name=run_name, label: str | None = None,
          stem: str | None = None) -> None:
    """Trains (or prints the commands of, or only collects) one run per value and writes the table and plot.

    ``name(field, value)`` names each run's directory, ``label`` the table's first column (the field's last name),
    ``stem`` the result files (``sweep_<last name>``); scripts/sweep_k.py keeps its own through them.
    """
    if not values:
        raise errors.Refusal("--values is empty: give the values to sweep, comma-separated.")
    short = field.split(".")[-1]
    label, stem = label or short, stem or f"sweep_{short}"
    root_path = epath.Path(root)
    run_dirs = {value: root_path / name(field, value) for value in values}
    if print_commands:
        for value, workdir in run_dirs.items():
            print(shlex.join(command(config_file, workdir, field, value, passthrough)))
        return
    if not collect_only:
        for value, workdir in run_dirs.items():
            # A finished run is skipped; an unfinished one resumes from its latest checkpoint.
            if workdirs.finished(workdir) is None:
                subprocess.run(command(config_file, workdir, field, value, passthrough), check=True,
                               env={**os.environ})
    # The final metrics of every finished run (a run's intermediate metrics.json does not count).
    results = {value: done["metrics"] for value, workdir in run_dirs.items()
               if (done := workdirs.finished(workdir)) is not None}
    if not results:
        raise errors.Refusal(f"No finished runs under {root}.")
    numeric = all(re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", v) for v in results)
    ordered = sorted(results, key=float) if numeric else list(results)
    lines = [f"| {label} | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(f"{100 * results[v][n]:.1f}" for n in METRICS) + " |" for v in ordered]
    table = "\n".join(lines)
    print(table)
    (root_path / f"{stem}.md").write_text(table + "\n")
    (root_path / f"{stem}.json").write_text(json.dumps(results, indent=1))
    figure, axis = pyplot.subplots(figsize=(5, 3.5))
    points = [100 * results[v]["AP"] for v in ordered]
    if numeric:
        axis.plot([float(v) for v in ordered], points, marker="o")
    else:
        axis.bar(ordered, points)
    axis.set_xlabel(field)
    axis.set_ylabel("box AP")
    axis.set_title(epath.Path(config_file).name)
    axis.grid(alpha=0.3)
    with (root_path / f"{stem}.png").open("wb") as f:
        figure.savefig(f, dpi=120, bbox_inches="tight")
    print(f"Wrote {root_path / stem}.md, {stem}.json, {stem}.png")


def passthrough_flags(field: str) -> list[str]:
    """The command line's ``--config.*`` flags, except the swept field's."""
    return [a for a in sys.argv[1:] if a.startswith("--config.") and not re.match(rf"--config\.{re.escape(field)}(=|$)",
                                                                                     a)]


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    _ROOT = flags.DEFINE_string("root", None, "One workdir per value is made under it.")
    _FIELD = flags.DEFINE_string("field", "assigner.topk", "The config field swept, dotted (assigner.topk).")
    _VALUES = flags.DEFINE_list("values", None, "Its values, comma-separated.")
    _PRINT = flags.DEFINE_bool("print_commands", False, "Print one training command per value and stop.")
    _COLLECT = flags.DEFINE_bool("collect_only", False, "Only collect the metrics of finished runs.")
    flags.mark_flags_as_required(["config", "root", "values"])

    def main(argv):
        del argv
        sweep(config_flags.get_config_filename(flags.FLAGS["config"]), _ROOT.value, _FIELD.value, _VALUES.value,
              passthrough_flags(_FIELD.value), print_commands=_PRINT.value, collect_only=_COLLECT.value)

    cli.run(main, "sweep")
