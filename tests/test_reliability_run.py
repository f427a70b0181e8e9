"""Faults while running: each leaves a clear message, the right exit code, and a workdir that resumes
to what an uninterrupted run of the tiny config gives (``tiny_trainings``), or keeps and names its last good
checkpoint."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from atss_jax import checkpoint, evaluator, preemption, train
from tests.support import hangs, launch
from tests.test_train import ROOT, _config, _final_state

pytestmark = pytest.mark.e2e  # README "Tests": the slow tier


def _start(args, stderr_path):
    """A one-device `python <args>` whose stdout is read line by line and whose (long) log goes to a file."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=launch.clean_environment(1),
                            stdout=subprocess.PIPE, stderr=open(stderr_path, "w"), text=True)


def _sigterm_after(process, line_start):
    """Sends SIGTERM once the process prints a line starting with `line_start`; its exit code."""
    for line in process.stdout:
        if line.startswith(line_start):
            process.send_signal(signal.SIGTERM)
            break
    process.stdout.read()
    return process.wait(timeout=hangs.SUBPROCESS_S)


def _main_args(workdir, data_dir, *flags):
    return ["-m", "atss_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *flags]


def _assert_same_state(workdir, reference, config):
    for a, b in zip(jax.tree.leaves(_final_state(config, workdir)), jax.tree.leaves(_final_state(config, reference))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _checkpoints(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_sigterm_in_training_saves_says_so_exits_143_and_resumes_to_the_uninterrupted_run(tiny_trainings,
                                                                                          tmp_path):
    data_dir, workdirs = tiny_trainings
    workdir = str(tmp_path / "w")
    process = _start(_main_args(workdir, data_dir), tmp_path / "stderr")
    # The handler is installed before this line: SIGTERM stops the run after step 1, saved.
    returncode = _sigterm_after(process, "Training steps 1..3")
    stderr = (tmp_path / "stderr").read_text()
    assert returncode == preemption.PREEMPTED_EXIT_CODE == 143, stderr[-3000:]
    assert f"Preempted (SIGTERM) at step 1: checkpoint {workdir}/checkpoints/1 is saved" in stderr
    assert _checkpoints(workdir) == ["1"]
    assert not os.path.exists(os.path.join(workdir, "finished.json"))
    config = _config(data_dir)
    summary = train.train_and_evaluate(config, workdir)
    _assert_same_state(workdir, workdirs[1], config)
    with open(os.path.join(workdirs[1], "finished.json")) as f:
        assert summary["metrics"] == pytest.approx(json.load(f)["metrics"], abs=1e-6)


def test_sigterm_in_eval_mode_stops_before_scoring_and_the_rerun_scores_once(tiny_trainings, tmp_path):
    data_dir, workdirs = tiny_trainings
    workdir = str(tmp_path / "w")
    shutil.copytree(workdirs[1], workdir, ignore=shutil.ignore_patterns("eval", "metrics.json", "events.*"))
    process = _start(["-m", "atss_jax.main", f"--workdir={workdir}", "--mode=eval"], tmp_path / "stderr")
    returncode = _sigterm_after(process, "Evaluating checkpoint step 3")
    stderr = (tmp_path / "stderr").read_text()
    assert returncode == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "SIGTERM (preemption) stopped the evaluation before it wrote anything" in stderr
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        summary = evaluator.evaluate_checkpoint(_config(data_dir), workdir)
    finally:
        signal.signal(signal.SIGTERM, previous)
    # The training's own final evaluation of the same checkpoint: a detection merged twice would change it.
    with open(os.path.join(workdirs[1], "finished.json")) as f:
        assert summary["metrics"] == pytest.approx(json.load(f)["metrics"], abs=1e-6)
    assert os.listdir(evaluator.step_dir(workdir, 3)).count("detections_host0.json") == 1
    assert not [n for n in os.listdir(evaluator.step_dir(workdir, 3)) if n.endswith(".partial")]


# Runs the entry point with the training data's iterator raising at its third batch (step 3), when the save
# of step 2 may still be pending.
FAULT_SCRIPT = """
import sys
from atss_jax import cli, main, train

real_dataset = train.pipeline.train_dataset


class Faulty:
    def __init__(self, dataset):
        self.dataset = dataset

    def as_numpy_iterator(self):
        for index, batch in enumerate(self.dataset.as_numpy_iterator()):
            if index == 2:
                raise RuntimeError("injected fault")
            yield batch


train.pipeline.train_dataset = lambda *args, **kwargs: Faulty(real_dataset(*args, **kwargs))
sys.argv = ["atss_jax.main", *sys.argv[1:]]
cli.run(main.main, "atss_jax.main")
"""


def test_exception_mid_loop_is_reported_first_and_the_workdir_resumes_to_the_uninterrupted_run(tiny_trainings,
                                                                                                  tmp_path):
    data_dir, workdirs = tiny_trainings
    workdir = str(tmp_path / "w")
    process = _start(["-c", FAULT_SCRIPT, *_main_args(workdir, data_dir)[2:]], tmp_path / "stderr")
    process.stdout.read()
    returncode = process.wait(timeout=hangs.SUBPROCESS_S)
    stderr = (tmp_path / "stderr").read_text()
    assert returncode == 1, stderr[-3000:]
    # The cause on its own line, before the traceback; then where the run can resume from.
    report = stderr[stderr.index("RuntimeError: injected fault\n"):]
    assert report.splitlines()[1].startswith(f"Training stopped by this error; the newest checkpoint is {workdir}")
    assert report.index("Traceback (for a bug report)") > 0
    assert "asyncio" not in stderr and "Exception ignored" not in stderr
    assert _checkpoints(workdir) == ["1", "2"]  # the pending save finished; no *.orbax-checkpoint-tmp
    train.train_and_evaluate(_config(data_dir), workdir)
    _assert_same_state(workdir, workdirs[1], _config(data_dir))


def _mount_tmpfs(directory, size):
    """Mounts a tmpfs of `size` at `directory`; False where this machine does not allow it (not root)."""
    os.makedirs(directory)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory],
                              capture_output=True, timeout=hangs.SERVER_S).returncode == 0
    except OSError:
        return False


def _files_of_one_megabyte():
    """In the child: files stop growing at 1 MB (writes fail as on a full disk; SIGXFSZ ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))


def test_a_full_disk_stops_in_one_line_leaves_no_partial_checkpoint_and_the_rerun_resumes(synthetic_data_config,
                                                                                          tmp_path):
    # A workdir on a 9 MB tmpfs: the first checkpoint (about 6 MB) fits, the second does not. Where mounting is
    # not allowed, every file stops at 1 MB instead, so that the first checkpoint fails.
    disk = str(tmp_path / "disk")
    on_tmpfs = _mount_tmpfs(disk, "9m")
    workdir = os.path.join(disk, "w")
    try:
        command = [sys.executable, *_main_args(workdir, synthetic_data_config.data_dir,
                                               "--config.train.checkpoint_every=1")]
        full = subprocess.run(command, cwd=ROOT, env=launch.clean_environment(1), capture_output=True, text=True,
                              timeout=hangs.SUBPROCESS_S, preexec_fn=None if on_tmpfs else _files_of_one_megabyte)
        assert full.returncode == 1, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith(f"atss_jax.main: Writing a checkpoint into {workdir}/checkpoints failed: "), last
        newest = f"the newest checkpoint is {workdir}/checkpoints/1" if on_tmpfs else "no checkpoint was saved"
        assert "Its partial files are removed" in last and f"Training stopped by this error; {newest}" in last
        assert not [name for name in _checkpoints(workdir) if "tmp" in name]
        assert _checkpoints(workdir) == (["1"] if on_tmpfs else [])
        if on_tmpfs:  # space freed
            subprocess.run(["mount", "-o", "remount,size=256m", disk], check=True, timeout=hangs.SERVER_S)
        rerun = subprocess.run(command, cwd=ROOT, env=launch.clean_environment(1), capture_output=True, text=True,
                               timeout=hangs.SUBPROCESS_S)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert ("Training steps 2..3" if on_tmpfs else "Training steps 1..3") in rerun.stdout
        assert _checkpoints(workdir) == ["1", "2", "3"]
    finally:
        if on_tmpfs:
            subprocess.run(["umount", disk], timeout=hangs.SERVER_S)


def test_divergence_keeps_the_last_good_checkpoint_and_a_lower_rate_resumes_from_it(synthetic_data_config,
                                                                                   tmp_path, capsys):
    config = _config(synthetic_data_config.data_dir)
    # A tiny first step (good), then a huge rate: step 2's update explodes, seen in step 3's loss.
    config.optimizer.warmup_factor = 1e-7
    config.optimizer.base_lr = 1e5
    config.train.eval_every = -1  # what is checked is the training and its checkpoints
    workdir = str(tmp_path)
    with pytest.raises(FloatingPointError) as error:
        train.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "at step 3" in message and f"the last good one is step 1 in {workdir}/checkpoints" in message
    assert "--config.optimizer.base_lr=10000 " in message
    assert _checkpoints(workdir) == ["1"]  # step 2's parameters diverged: its checkpoint is gone
    kept = _final_state(config, workdir)
    config.optimizer.base_lr = 0.01
    capsys.readouterr()
    train.train_and_evaluate(config, workdir)
    assert "Training steps 2..3" in capsys.readouterr().out
    resumed = _final_state(config, workdir, step=3)
    assert int(resumed.step) == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(resumed.params))
    # The resumed run started from the checkpoint the diverged run kept, and kept it.
    np.testing.assert_array_equal(jax.tree.leaves(_final_state(config, workdir, step=1).params)[0],
                                  jax.tree.leaves(kept.params)[0])


def _largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_step_naming_it(tiny_trainings, tmp_path, caplog):
    data_dir, workdirs = tiny_trainings
    config = _config(data_dir)
    workdir = str(tmp_path / "w")
    shutil.copytree(workdirs[1], workdir, ignore=shutil.ignore_patterns("finished.json"))
    corrupt = _largest_file(os.path.join(workdir, "checkpoints", "3"))
    with open(corrupt, "r+b") as f:
        f.truncate(os.path.getsize(corrupt) // 2)
    state = _final_state(config, workdir)  # restores the latest readable checkpoint
    assert int(state.step) == 2
    assert f"Checkpoint {workdir}/checkpoints/3 is unreadable" in caplog.text
    assert "falling back to the previous checkpoint, step 2" in caplog.text
    assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "3"))
    train.train_and_evaluate(config, workdir)  # trains step 3 again: nothing lost
    _assert_same_state(workdir, workdirs[1], config)


def test_missing_pretrained_weights_and_eval_split_stop_before_anything_is_built(synthetic_data_config, tmp_path,
                                                                                  monkeypatch):
    def build(config):
        raise AssertionError("the model was built before the bad input was reported")

    monkeypatch.setattr(train, "create_training", build)
    config = _config(synthetic_data_config.data_dir)
    config.model.backbone.pretrained = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r"config.model.backbone.pretrained=.*missing.pth.* does not exist"):
        train.train_and_evaluate(config, str(tmp_path))
    config = _config(synthetic_data_config.data_dir)
    config.data.eval_split = "validaton"
    with pytest.raises(ValueError, match="has no split 'validaton'"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_variables_restore_for_evaluation_falls_back_past_deleted_data_files(tiny_trainings, tmp_path, caplog):
    data_dir, workdirs = tiny_trainings
    config = _config(data_dir)
    workdir = str(tmp_path / "w")
    shutil.copytree(workdirs[1], workdir)
    # Every data file (the largest alone may hold only optimiser state, which a variables-only restore skips).
    for root, _, names in os.walk(os.path.join(workdir, "checkpoints", "3")):
        if os.path.basename(root) == "d":
            for name in names:
                os.remove(os.path.join(root, name))
    from atss_jax.anchors import anchors_per_location
    from atss_jax.models.detector import abstract_variables, build_detector

    model = build_detector(config.model, anchors_per_location(config.anchors))
    restored = checkpoint.restore_variables(workdir, abstract_variables(model, tuple(config.data.canvas)))
    assert restored.step == 2 and "falling back to the previous checkpoint, step 2" in caplog.text
    for a, b in zip(jax.tree.leaves(restored.variables["params"]),
                    jax.tree.leaves(_final_state(config, workdirs[1], step=2).params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints/3 cannot be restored"):
        checkpoint.restore_variables(workdir, abstract_variables(model, tuple(config.data.canvas)), step=3)


def test_sigterm_stops_an_export_and_the_rerun_writes_a_complete_one(tiny_trainings, tmp_path):
    _, workdirs = tiny_trainings
    export_dir = tmp_path / "export"
    args = ["-m", "scripts.export", f"--workdir={workdirs[1]}", f"--export_dir={export_dir}", "--serving_platforms=cpu"]
    process = _start(args, tmp_path / "stderr")
    deadline = time.monotonic() + hangs.SUBPROCESS_S
    while not export_dir.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # mid-export: its folder exists, the variables are being written
    process.stdout.read()
    # Killed by the signal (the default action, nothing holds it back): -15 from Popen, 143 from a shell.
    assert process.wait(timeout=hangs.SUBPROCESS_S) == -signal.SIGTERM, (tmp_path / "stderr").read_text()[-3000:]
    assert not (export_dir / "serving.json").exists()  # the contract is written last: no half export looks whole
    rerun = _start(args, tmp_path / "stderr2")
    rerun.stdout.read()
    assert rerun.wait(timeout=hangs.SUBPROCESS_S) == 0, (tmp_path / "stderr2").read_text()[-3000:]
    contract = json.loads((export_dir / "serving.json").read_text())
    assert (export_dir / contract["artifacts"][0]["file"]).stat().st_size > 0
    assert (export_dir / checkpoint.EXPORT_CONFIG).exists()
