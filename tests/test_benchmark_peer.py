"""scripts/benchmark_peer.py at CI size: mmdetection 3.3.0's real ATSS and ours from the same weights on the
same batch, the first step's loss terms compared before any ratio is printed, and its per-op-class profile."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# accelerator_check.sh's smoke flags: XLA:CPU compiles about twice as fast without LLVM's optimisations.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_smoke_run_agrees_with_mmdetection_and_reports_both_sides(tmp_path):
    out = tmp_path / "peer.json"
    result = subprocess.run([sys.executable, "-m", "scripts.benchmark_peer", "--device=cpu", "--smoke",
                             "--profile", f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "JAX_PLATFORMS": "cpu",
                                 "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out) as f:
        report = json.load(f)
    # The loss terms come from two independent implementations (mmdetection's torch code and ours); a
    # meaningful agreement needs positives, hence a non-zero box and centre-ness loss.
    agreement = report["loss_agreement"]
    assert set(agreement) == {"classification", "box", "centerness"}
    for term, row in agreement.items():
        assert row["mmdet"] > 0, term
        assert abs(row["ours"] - row["mmdet"]) <= 1e-4 * row["mmdet"], (term, row)
    assert report["losses_agree"] and report["rtol"] == 1e-4
    assert report["batch_per_device"] == 2 and report["canvas"] == [128, 128] and report["dtype"] == "float32"
    assert report["mfu"] is None and report["peak_memory_gib"] is None  # unknown on a CPU
    for key in ("images_per_second", "mmdet_images_per_second", "inference_images_per_second",
                "mmdet_inference_images_per_second"):
        assert report[key] > 0, key
    assert report["train_ratio"] == report["images_per_second"] / report["mmdet_images_per_second"]
    assert 0 <= report["assignment_share"] < 1 and 0 < report["mmdet_assignment_share"] < 1
    assert "| project / mmdetection |" in result.stdout
    # --profile: one thread, one step of each side split into op classes from the two profilers' own events.
    assert report["one_thread"]
    profile = report["profile_seconds"]
    for side in ("ours", "mmdet"):
        assert set(profile[side]) == {"conv_forward", "conv_backward", "layout", "other"}
        assert profile[side]["conv_forward"] > 0 and profile[side]["conv_backward"] > 0, (side, profile[side])
        # The op events cover most of one step (the rest: Python, dispatch), never more than it took.
        step_seconds = report["batch_per_device"] / report[{"ours": "images_per_second",
                                                             "mmdet": "mmdet_images_per_second"}[side]]
        assert 0.3 * step_seconds < sum(profile[side].values()) < 1.5 * step_seconds, (side, profile[side])
    assert "One training step on one thread" in result.stdout
