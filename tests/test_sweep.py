"""scripts/sweep.py over any field: the commands it prints, and the table and plot it collects (string values)."""

import json

import pytest

from atss_jax import coco_eval, workdirs
from tests.test_scripts import _run

pytestmark = pytest.mark.e2e  # README "Tests": the slow tier


def test_sweep_prints_commands_for_any_field_and_collects(tmp_path):
    printed = _run(["-m", "scripts.sweep", "--config=configs/demo_assigners.py", f"--root={tmp_path}",
                    "--field=assigner.name", "--values=atss,tal", "--print_commands", "--config.train.num_steps=7",
                    "--config.assigner.name=ignored"]).stdout.strip().splitlines()
    assert len(printed) == 2 and "--config.assigner.name=atss" in printed[0] and f"{tmp_path}/nametal" in printed[1]
    assert all("--config.train.num_steps=7" in line and "name=ignored" not in line for line in printed)
    variants = _run(["-m", "scripts.sweep", "--config=configs/demo_assigners.py", f"--root={tmp_path}",
                     "--field=variant", "--values=atss,tal", "--print_commands"]).stdout.strip().splitlines()
    assert "--config=configs/demo_assigners.py:atss" in variants[0] and "--config.variant" not in variants[0]
    for name, ap in (("atss", 0.25), ("tal", 0.5)):
        metrics = {metric: ap for metric in coco_eval.METRIC_NAMES}
        (tmp_path / f"name{name}").mkdir()
        workdirs.mark_finished(tmp_path / f"name{name}", 7, metrics)
    table = _run(["-m", "scripts.sweep", "--config=configs/demo_assigners.py", f"--root={tmp_path}",
                  "--field=assigner.name", "--values=atss,tal", "--collect_only"]).stdout
    assert "| name | AP |" in table and "| atss | 25.0 |" in table and "| tal | 50.0 |" in table
    assert set(json.loads((tmp_path / "sweep_name.json").read_text())) == {"atss", "tal"}
    assert (tmp_path / "sweep_name.png").stat().st_size > 1000
