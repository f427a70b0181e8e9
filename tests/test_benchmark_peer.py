"""scripts/benchmark_peer.py at CI size: mmdetection 3.3.0's real ATSS and ours from the same weights on the
same batch, the first step's loss terms compared before any ratio is printed, and its per-op-class profile.
The run is accelerator_check.sh's smoke step (``--device=cpu --smoke --profile``), shared with its test."""

import pytest

pytestmark = pytest.mark.e2e


def test_smoke_run_agrees_with_mmdetection_and_reports_both_sides(accelerator_smoke):
    step = accelerator_smoke.steps["peer"]
    assert step["status"] == "ok", step
    assert "-m scripts.benchmark_peer --device=cpu --smoke --profile" in step["attempts"][-1]["command"]
    report = step["result"]
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
    assert "| project / mmdetection |" in accelerator_smoke.log
    # --profile: one thread, one step of each side split into op classes from the two profilers' own events.
    assert report["one_thread"]
    profile, step_seconds = report["profile_seconds"], report["profile_step_seconds"]
    for side in ("ours", "mmdet"):
        assert set(profile[side]) == {"conv_forward", "conv_backward", "layout", "other"}
        assert profile[side]["conv_forward"] > 0 and profile[side]["conv_backward"] > 0, (side, profile[side])
        # The op events cover most of the profiled step (the rest: Python, dispatch), never more than it took;
        # both are times of that one step, so a busy machine stretches them alike.
        assert 0.3 * step_seconds[side] < sum(profile[side].values()) < 1.5 * step_seconds[side], (
            side, profile[side], step_seconds[side])
    assert "One training step on one thread" in accelerator_smoke.log
