"""Orbax checkpoints: the training state (periodic async saves, resume, preemption), the model variables
alone (evaluation, export), and inference exports."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from atss_jax import errors, preemption

# Where a workdir keeps its train-state checkpoints (atss_jax.workdir: the other files it holds).
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(errors.Refusal, RuntimeError):
    """A checkpoint or export is missing, corrupt, or does not fit the model."""


class CheckpointSaveError(errors.Refusal, OSError):
    """Writing a checkpoint failed (a full disk, a bucket out of reach); the checkpoints saved before are kept."""


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


class TrainCheckpoints:
    """Periodic asynchronous saves of the train state, resume from the latest readable one, a save on preemption.

    On one host, SIGTERM (what schedulers send before preemption) sets a flag that `should_stop`
    reports at the next step; on several hosts, JAX's preemption sync point makes all hosts stop at
    the same step.
    """

    def __init__(self, directory: epath.Path, train_config: ml_collections.ConfigDict):
        self.directory = epath.Path(directory)
        # cleanup_tmp_directories: a process killed mid-save leaves "<step>.orbax-checkpoint-tmp*" behind.
        options = ocp.CheckpointManagerOptions(max_to_keep=train_config.max_checkpoints_to_keep, create=True,
                                               enable_async_checkpointing=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.sigterm = preemption.SigtermFlag()
        if jax.process_count() == 1:
            self.sigterm.install()

    def restore(self, state: Any, step: int | None = None) -> Any:
        """Checkpoint `step` (default: the latest readable one) restored into `state`'s structure and shardings.

        Without any checkpoint, `state` itself when no step was asked for. Newer checkpoints that cannot be
        read while an older one can (a file truncated or deleted) are named in a warning and moved to
        `unreadable_dir`, out of the way of the steps that training saves again.
        """
        if step is not None:
            if step not in self.manager.all_steps():
                raise CheckpointError(f"No checkpoint of step {step} in {self.directory}; there are "
                                      f"{sorted(self.manager.all_steps())}.")
            return self._restore(step, state)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return state
        step, restored = latest_readable(self.directory, steps, lambda s: self._restore(s, state))
        unreadable = [s for s in steps if s > step]
        if unreadable:
            if jax.process_index() == 0:
                self.unreadable_dir.mkdir(parents=True, exist_ok=True)
                for bad in unreadable:
                    (self.directory / str(bad)).rename(self.unreadable_dir / str(bad))
            multihost_utils.sync_global_devices("unreadable checkpoints moved")
            self.manager.reload()
            logging.warning("Moved the unreadable checkpoints %s to %s.", unreadable, self.unreadable_dir)
        return restored

    @property
    def unreadable_dir(self) -> epath.Path:
        return self.directory.parent / f"{self.directory.name}_unreadable"

    def _restore(self, step: int, state: Any) -> Any:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:
            raise CheckpointError(f"Checkpoint {self.directory / str(step)} cannot be restored into the model of "
                                  f"this config ({_brief(error)}). Remove it, or train in a new workdir.") from error

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.sigterm.requested

    def save(self, step: int, state: Any) -> None:
        """Starts saving `state` in the background. Raises CheckpointSaveError if the previous save failed
        (Orbax reports a failed background save at the next save or wait)."""
        try:
            self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except Exception as error:
            raise self._save_failed(error) from error

    def wait(self) -> None:
        """Waits for the background saves; raises CheckpointSaveError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(error) from error

    def _save_failed(self, error: Exception) -> CheckpointSaveError:
        # The end of Orbax's message holds the operating system's reason ("No space left on device").
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
        reason = reason if len(reason) <= 200 else "..." + reason[-200:]
        return CheckpointSaveError(f"Writing a checkpoint into {self.directory} failed: {reason}. Its partial files "
                                   "are removed; free space (or restore access to the bucket) and run again.")

    def finish_or_clean(self) -> None:
        """After a failure: lets pending saves finish (they hold states that passed the checks), then removes the
        temporary directories of saves that failed, whenever Orbax reported them (at a save, a wait or now), so
        that the workdir resumes from its last complete step."""
        try:
            self.wait()
        except CheckpointSaveError as error:
            logging.error("%s", error)
        if jax.process_index() == 0:
            for path in self.directory.glob("*.orbax-checkpoint-tmp*"):  # a finished save has renamed its own
                path.rmtree()
        self.manager.reload()

    def remove_from(self, step: int) -> list[int]:
        """Deletes the checkpoints of `step` and later (states of a diverged run); returns the steps left."""
        self.wait()
        for newer in [s for s in self.manager.all_steps() if s >= step]:
            self.manager.delete(newer)
        return sorted(self.manager.all_steps())


def latest_readable(directory: epath.Path, steps: list[int], restore: Callable[[int], Any]) -> tuple[int, Any]:
    """(step, restore(step)) of the first of `steps` (newest first) that `restore` reads without a
    CheckpointError; one warning per unreadable one. When none can be read, the newest one's error."""
    failures = []
    for step in steps:
        try:
            restored = restore(step)
        except CheckpointError as error:
            failures.append(error)
            continue
        for bad, error in zip(steps, failures):
            logging.warning("Checkpoint %s is unreadable (%s); falling back to the previous checkpoint, step %d.",
                            directory / str(bad), _brief(error.__cause__), step)
        return step, restored
    raise failures[0]


def _brief(error: BaseException) -> str:
    """The exception's type and first line: orbax errors can run to pages."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first[:300]}{' ...' if len(lines) > 1 or len(first) > 300 else ''}"


class RestoredVariables(NamedTuple):
    """The model variables of one training checkpoint."""

    step: int
    variables: dict  # {"params": ..., and the norm collections ("frozen", "batch_stats")}


def restore_variables(workdir: str | epath.Path, abstract_variables: dict,
                      step: int | None = None) -> RestoredVariables:
    """The model variables of checkpoint ``step`` (default: the latest) of ``workdir``: no optimiser state.

    Args:
      workdir: a training workdir (its checkpoints are in ``checkpoint_dir(workdir)``).
      abstract_variables: the model's variables as ``jax.ShapeDtypeStruct`` leaves, with the
        shardings to restore them into (e.g. replicated over the mesh).
      step: the checkpoint; None for the latest readable one (unreadable newer ones are named in a warning).
    """
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory)
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(f"No checkpoint in {directory}.")
    if step is not None and step not in steps:
        raise CheckpointError(f"No checkpoint of step {step} in {directory}; there are {steps}.")
    params, model_state = abstract_variables["params"], {k: v for k, v in abstract_variables.items() if k != "params"}
    # The train state's other fields (optimiser state, step) are left on disk.
    item = {"params": params, "model_state": model_state}

    def restore(step: int) -> dict:
        try:
            restored = manager.restore(step, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        except Exception as error:
            raise CheckpointError(f"Checkpoint {directory / str(step)} cannot be restored into the model of this "
                                  f"config ({_brief(error)}).") from error
        return {"params": restored["params"], **restored["model_state"]}

    if step is not None:
        return RestoredVariables(step, restore(step))
    return RestoredVariables(*latest_readable(directory, steps[::-1], restore))


EXPORT_CONFIG = "config.json"
EXPORT_VARIABLES = "variables"


def export_inference(directory: str, variables: dict, config: ml_collections.ConfigDict,
                     category_ids: tuple[int, ...], category_names: tuple[str, ...],
                     parameter_dtype: str = "float32") -> None:
    """Writes an inference export: the model variables (no optimiser state) and the config + categories.

    `parameter_dtype="bfloat16"` stores the float32 variables in bfloat16 (half the size); the
    `Detector` casts them back to float32.
    """
    variables = jax.tree.map(lambda x: x.astype(parameter_dtype) if x.dtype == "float32" else x, variables)
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(_absolute(path / EXPORT_VARIABLES), variables, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (path / EXPORT_CONFIG).write_text(json.dumps({
            "config": json.loads(config.to_json()), "category_ids": list(category_ids),
            "category_names": list(category_names), "parameter_dtype": parameter_dtype}, indent=1))


def _absolute(path: epath.Path) -> epath.Path:
    """Orbax wants absolute local paths; a bucket path (gs://...) is already absolute and must stay remote."""
    return path if "://" in str(path) else path.resolve()


def load_export_metadata(directory: str) -> dict:
    path = epath.Path(directory) / EXPORT_CONFIG
    if not path.exists():
        raise CheckpointError(f"{directory} is not an inference export: {path} is missing.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is corrupt: {error}.") from None


def restore_inference(directory: str, abstract_variables: Any) -> dict:
    """The exported variables, restored into `abstract_variables`' structure."""
    path = _absolute(epath.Path(directory) / EXPORT_VARIABLES)
    try:
        return ocp.StandardCheckpointer().restore(path, abstract_variables)
    except Exception as error:
        raise CheckpointError(f"Export {path} cannot be restored ({type(error).__name__}: {error}).") from error
