"""scripts/accelerator_check.sh: its smoke run on CPU, and the TensorFlow-free benchmark path it needs on the
accelerator machine (no TensorFlow, TFDS or clu there)."""

import json
import os
import subprocess
import sys

import pytest

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
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []  # nor the loop (clu, the pipeline)


def _check(tmp_path, *args):
    out = tmp_path / "results"
    result = subprocess.run(["bash", "scripts/accelerator_check.sh", "--out", str(out), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    with open(out / "accelerator_check.json") as f:
        results = json.load(f)
    return result, {step["name"]: step for step in results["steps"]}, results


def test_smoke_run_records_every_benchmark(tmp_path):
    # bf16's first attempt reports out-of-memory (simulated), so the fallback batch is exercised too.
    result, steps, results = _check(tmp_path, "--smoke", "--simulate_oom=bfloat16")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert results["mode"] == "smoke" and results["environment"]["backend"] == "cpu"
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
    assert sorted(os.listdir(tmp_path / "results")) == [f"accelerator_check.{ext}" for ext in ("json", "log", "md")]


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
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown step bogus" in unknown.stderr
