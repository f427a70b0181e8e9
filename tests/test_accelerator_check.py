"""scripts/accelerator_check.sh: its smoke run on CPU, and the TensorFlow-free benchmark path it needs on the
accelerator machine (no TensorFlow, TFDS or clu there)."""

import json
import os
import subprocess
import sys

import pytest

from tests.support import accelerator_check, hangs

pytestmark = pytest.mark.e2e  # README "Tests": the slow tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")
# Scripts of other issues: recorded as "not landed" until they exist, then run.
LATER = {"peer": "scripts/benchmark_peer.py", "peer_bfloat16": "scripts/benchmark_peer.py",
         "predict": "scripts/benchmark_predict.py"}

# Installs an import blocker for BLOCKED, imports the module, prints the blocked modules that got loaded.
_BLOCKED_IMPORT = f"""
import importlib.abc, importlib, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed on the accelerator machine")
        return None

sys.meta_path.insert(0, Blocker())
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} or m == "atss_jax.train")))
"""


@pytest.mark.parametrize("module", ["scripts.benchmark_train", "scripts.benchmark_dcn", "scripts.benchmark_predict"])
def test_benchmarks_import_without_tensorflow(module):
    result = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, module], cwd=ROOT, capture_output=True,
                            text=True, timeout=hangs.SUBPROCESS_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []  # nor the loop (clu, the pipeline)


def _check(tmp_path, *args):
    check = accelerator_check.run(str(tmp_path / "results"), *args)
    return check.process, check.steps, check.results


def test_smoke_run_records_every_benchmark(accelerator_smoke):
    # bf16's first attempt reports out-of-memory (simulated), so the fallback batch is exercised too.
    result, steps, results = accelerator_smoke.process, accelerator_smoke.steps, accelerator_smoke.results
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert results["mode"] == "smoke" and results["environment"]["backend"] == "cpu"
    # No budget: a smoke step stops at the hang guard only, however slow the machine.
    assert results["budget_seconds"] is None and "budget none" in result.stdout
    assert all(attempt["limit_seconds"] == 3600 for step in steps.values() for attempt in step["attempts"])
    assert list(steps) == ["train_bfloat16", "train_float32", "dcn_bfloat16", "peer", "predict"]
    for name, batch in (("train_float32", 2), ("train_bfloat16", 1)):
        step = steps[name]
        assert step["status"] == "ok" and step["batch_per_device"] == batch, step
        assert step["result"]["dtype"] == name.removeprefix("train_") and step["result"]["images_per_second"] > 0
        assert 0 <= step["result"]["assignment_share"] < 1
    oom, fallback = steps["train_bfloat16"]["attempts"]
    assert oom["out_of_memory"] and oom["batch_per_device"] == 2 and fallback["status"] == "ok"
    assert steps["train_bfloat16"]["fallback"] == "2 images/device ran out of memory; 1 used"
    dcn = steps["dcn_bfloat16"]
    assert dcn["status"] == "ok" and dcn["result"]["dtype"] == "bfloat16"
    assert [row["pass"] for row in dcn["result"]["rows"]] == ["forward", "forward+backward"]
    for name, script in LATER.items():
        if name == "peer_bfloat16":  # full runs only, unless --only names it
            continue
        if os.path.exists(os.path.join(ROOT, script)):
            assert steps[name]["status"] == "ok", steps[name]
        else:
            assert steps[name]["status"] == "not landed" and not steps[name]["attempts"]
    assert "| train_float32 | ok | 2 |" in result.stdout and "| peer |" in result.stdout
    written = sorted(os.listdir(accelerator_smoke.out_dir))
    assert written == [f"accelerator_check.{ext}" for ext in ("json", "log", "md")]


def test_budget_stops_a_hung_step_and_skips_what_no_longer_fits(tmp_path):
    # 24 s for two steps weighted 130:30; train_float32 hangs (simulated) and is stopped at its share, at most
    # 24 * 130 / 160 = 19 s and at least the 15 s a step needs to start; what is left (at most 24 - 15) is under
    # those 15 s, so dcn_bfloat16 is skipped, however slowly the script itself runs.
    result, steps, results = _check(tmp_path, "--smoke", "--budget_s=24", "--only=train_float32,dcn_bfloat16",
                                    "--simulate_hang=train_float32")
    assert result.returncode == 1 and results["budget_seconds"] == 24  # nothing succeeded
    (hung,) = steps["train_float32"]["attempts"]
    assert steps["train_float32"]["status"] == "timeout" and hung["exit_status"] in (124, 137), hung
    assert 15 <= hung["limit_seconds"] <= 19 and hung["seconds"] >= hung["limit_seconds"] - 1, hung
    assert steps["dcn_bfloat16"]["status"] == "skipped: budget spent" and not steps["dcn_bfloat16"]["attempts"]
    assert "| train_float32 | timeout |" in result.stdout


@pytest.mark.parametrize(("args", "skipped"), [((), "skipped: no accelerator"),
                                               (("--allow_cpu", "--budget_s=0"), "skipped: budget spent")])
def test_full_run_commands_and_nothing_ran_exits_non_zero(tmp_path, args, skipped):
    # On this CPU a full run runs nothing (or, allowed the CPU, has no budget), but records the accelerator
    # commands it would have run, and fails.
    result, steps, results = _check(tmp_path, *args)
    assert result.returncode == 1 and results["mode"] == "full"
    for dtype in ("bfloat16", "float32"):
        command = steps[f"train_{dtype}"]["command"]
        assert "-m scripts.benchmark_train --config=configs/base.py" in command
        assert "--batch_per_device=16" in command and f"--config.model.dtype={dtype}" in command
    assert "-m scripts.benchmark_dcn --dtype=bfloat16" in steps["dcn_bfloat16"]["command"]
    assert "-m scripts.benchmark_peer --device=gpu --dtype=bfloat16" in steps["peer_bfloat16"]["command"]
    for name, step in steps.items():
        assert step["status"] == ("not landed" if name in LATER and not os.path.exists(
            os.path.join(ROOT, LATER[name])) else skipped), step


def test_only_runs_the_named_steps(tmp_path):
    result, steps, _ = _check(tmp_path, "--smoke", "--only=dcn_bfloat16")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(steps) == ["dcn_bfloat16"] and steps["dcn_bfloat16"]["status"] == "ok"
    unknown = subprocess.run(["bash", "scripts/accelerator_check.sh", "--smoke", "--only=peer,bogus"], cwd=ROOT,
                             capture_output=True, text=True, timeout=hangs.SUBPROCESS_S)
    assert unknown.returncode == 2 and "unknown step bogus" in unknown.stderr
