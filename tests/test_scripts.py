"""Smoke tests of the command lines: the demo at reduced size, prediction, k sweeps, the assignment figure."""

import json
import os
import subprocess
import sys

import pytest

from atss_jax import coco_eval, workdirs
from configs import demo
from tests.support import hangs

pytestmark = pytest.mark.e2e  # README "Tests": the slow tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **env):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=hangs.SUBPROCESS_S, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


SMALL_DEMO = ["--config.data.synthetic.num_train=32", "--config.data.synthetic.num_validation=8",
              "--config.train.num_steps=2", "--config.train.log_every=1", "--config.eval.batch_per_device=8"]
# The demo run also traces its second step with jax.profiler.
PROFILE = ["--config.train.profile_steps=1", "--config.train.profile_first_step=2"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    data_dir = tmp_path_factory.mktemp("demo_data")
    result = subprocess.run(["bash", "scripts/demo.sh", f"--config.data.data_dir={data_dir}", *SMALL_DEMO, *PROFILE],
                            cwd=ROOT, capture_output=True, text=True, timeout=hangs.SUBPROCESS_S,
                            env={**os.environ, "WORKDIR": str(workdir)})
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, data_dir, result.stdout


def test_demo_trains_evaluates_and_prints_the_coco_table(demo_run):
    workdir, _, stdout = demo_run
    assert "COCO box metrics at step 2" in stdout and "| AP | AP50 |" in stdout
    with open(workdir / "metrics.json") as f:
        assert list(json.load(f)["metrics"]) == list(coco_eval.METRIC_NAMES)


def test_the_workdir_describes_itself(demo_run):
    workdir, data_dir, _ = demo_run
    config = workdirs.read_config(workdir)
    expected = demo.get_config()
    with expected.unlocked():
        expected.data.data_dir = str(data_dir)
        expected.data.synthetic.num_train, expected.data.synthetic.num_validation = 32, 8
        expected.train.num_steps, expected.train.log_every, expected.eval.batch_per_device = 2, 1, 8
        expected.train.profile_steps, expected.train.profile_first_step = 1, 2
    assert config == expected  # the resolved config: every override applied, tuples kept
    finished = workdirs.finished(workdir)
    assert finished["step"] == 2
    with open(workdir / "metrics.json") as f:
        assert finished["metrics"] == json.load(f)["metrics"]
    assert workdirs.read_categories(workdir)[1] == ("rectangle", "ellipse", "triangle", "cross")


def test_profile_trace_is_written_for_tensorboard(demo_run):
    workdir, _, _ = demo_run
    (run,) = os.listdir(workdir / "plugins" / "profile")
    traces = [name for name in os.listdir(workdir / "plugins" / "profile" / run) if name.endswith(".xplane.pb")]
    assert len(traces) == 1 and (workdir / "plugins" / "profile" / run / traces[0]).stat().st_size > 1000


def test_eval_needs_only_the_workdir_and_takes_overrides_on_its_config(demo_run):
    workdir, _, _ = demo_run
    step_dir = workdir / "eval" / "step_2"
    # The workdir's config draws a few detections pictures; the override, applied on top of it, none.
    for overrides, drawn in (([], True), (["--config.eval.num_images_to_draw=0"], False)):
        for picture in step_dir.glob("detections_*.png"):
            picture.unlink()
        stdout = _run(["-m", "atss_jax.main", f"--workdir={workdir}", "--mode=eval", *overrides]).stdout
        assert "COCO box metrics at step 2" in stdout
        assert bool(list(step_dir.glob("detections_*.png"))) == drawn


def test_export_and_predict_command_lines(demo_run, tmp_path):
    workdir, data_dir, _ = demo_run
    # The workdir alone (its config.json and categories.json): no config file, no dataset flags.
    _run(["-m", "scripts.export", f"--workdir={workdir}", f"--export_dir={tmp_path / 'export'}", "--bf16"])
    images = next(p for p, _, files in os.walk(data_dir) if p.endswith(os.path.join("images", "validation")))
    image = os.path.join(images, sorted(os.listdir(images))[0])
    _run(["-m", "scripts.predict", f"--export_dir={tmp_path / 'export'}", f"--out_dir={tmp_path / 'out'}", image])
    with open(tmp_path / "out" / "detections.json") as f:
        (record,) = json.load(f)
    assert record["file"] == image
    assert os.path.exists(tmp_path / "out" / (os.path.basename(image) + ".png"))  # x.png -> x.png.png: no clash
    assert os.path.exists(tmp_path / "export" / "serving.json")


def test_visualise_assignment(demo_run, tmp_path):
    _, data_dir, _ = demo_run
    _run(["-m", "scripts.visualise_assignment", "--config=configs/demo.py", f"--out={tmp_path / 'a.png'}",
          f"--config.data.data_dir={data_dir}", *SMALL_DEMO[:2]])
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_sweep_k_prints_commands_and_collects(tmp_path):
    printed = _run(["-m", "scripts.sweep_k", "--config=configs/demo.py", f"--root={tmp_path}", "--ks=5,9",
                    "--print_commands", "--config.train.num_steps=7"]).stdout.strip().splitlines()
    assert len(printed) == 2 and "--config.assigner.topk=5" in printed[0] and "--config.train.num_steps=7" in printed[0]
    for k, ap in ((5, 0.25), (9, 0.5), (13, 0.75)):
        metrics = {name: ap for name in coco_eval.METRIC_NAMES}
        (tmp_path / f"k{k}").mkdir()
        (tmp_path / f"k{k}" / "metrics.json").write_text(json.dumps({"step": 3, "metrics": metrics}))
        if k != 13:  # k=13 evaluated at an intermediate step and has not finished
            workdirs.mark_finished(tmp_path / f"k{k}", 7, metrics)
    table = _run(["-m", "scripts.sweep_k", "--config=configs/demo.py", f"--root={tmp_path}", "--ks=5,9,13",
                  "--collect_only"]).stdout
    assert "| 5 | 25.0 |" in table and "| 9 | 50.0 |" in table and "| 13 |" not in table
    assert (tmp_path / "sweep_k.png").stat().st_size > 1000


def test_benchmark_dcn_writes_its_table(tmp_path):
    out = tmp_path / "dcn.json"
    printed = _run(["-m", "scripts.benchmark_dcn", "--height=12", "--width=16", "--channels=8", "--groups=2",
                    "--batch=1", "--repeats=2", f"--out={out}"]).stdout
    assert "| forward |" in printed and "| forward+backward |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [row["pass"] for row in rows] == ["forward", "forward+backward"]
    assert all(row["dcnv2_ms"] > 0 and row["dcnv2_gflops"] > row["conv3x3_gflops"] for row in rows)


def test_benchmark_assign_checks_agreement_and_writes_its_table(tmp_path):
    # The script itself exits non-zero unless all four implementations give the same assignment.
    out = tmp_path / "assign.json"
    printed = _run(["-m", "scripts.benchmark_assign", "--config=configs/base.py", "--canvas=512,768", "--batch=2",
                    "--num_boxes=8", "--repeats=1", "--loop_images=1", f"--json={out}"]).stdout
    assert "floor:" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [row["name"] for row in rows] == ["jax grid-aware", "jax full-matrix", "numpy per image", "numpy per box"]
    assert all(row["median_s"] > 0 for row in rows) and rows[0]["ratio"] == 1.0
    assert rows[0]["back_to_back_s"] > 0 and rows[2]["back_to_back_s"] is None
    # Every prediction-aware strategy against its per-image design, side by side.
    strategies = json.loads(out.read_text())["strategies"]
    assert [row["strategy"] for row in strategies] == ["tal", "simota", "ota", "paa"]
    assert [row["per_image_design"] for row in strategies] == [
        "mmdet TaskAlignedAssigner", "mmdet SimOTAAssigner", "numpy OTA (official design)",
        "numpy PAA (mmdet paa_reassign design)"]
    assert all(row["jax_s"] > 0 and row["per_image_s"] > 0 and row["agreement"] > 0.99 for row in strategies)
    for row in strategies:
        assert f"{row['agreement']:>8.4f}" in printed and row["per_image_design"] in printed


def test_benchmark_train_times_the_step_with_and_without_the_assigner(accelerator_smoke):
    # accelerator_check.sh's smoke step: benchmark_train --config=configs/demo.py:tiny --steps=1 at 2 images.
    step = accelerator_smoke.steps["train_float32"]
    assert step["status"] == "ok"
    assert "-m scripts.benchmark_train --config=configs/demo.py:tiny --steps=1" in step["attempts"][-1]["command"]
    result = step["result"]
    assert result["canvas"] == [128, 160] and result["batch_per_device"] == 2
    assert result["step_ms"] > 0 and result["step_ms_precomputed_assignment"] > 0
    assert 0 <= result["assignment_share"] < 1 and result["gflops_per_image"] > 0
