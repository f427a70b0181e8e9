"""Orbax checkpoints: the training state (periodic async saves, resume, preemption), the model variables
alone (evaluation, export), and inference exports."""

from __future__ import annotations

import json
import signal
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

# Where a workdir keeps its train-state checkpoints (atss_jax.workdir: the other files it holds).
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint or export is missing, corrupt, or does not fit the model."""


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


class TrainCheckpoints:
    """Periodic asynchronous saves of the train state, resume from the latest, and a save on preemption.

    On one host, SIGTERM (what schedulers send before preemption) sets a flag that `should_stop`
    reports at the next step; on several hosts, JAX's preemption sync point makes all hosts stop at
    the same step.
    """

    def __init__(self, directory: epath.Path, train_config: ml_collections.ConfigDict):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=train_config.max_checkpoints_to_keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._sigterm = False
        if jax.process_count() == 1:
            try:
                signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread (e.g. under some test runners): no handler
                pass

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._sigterm = True

    def restore(self, state: Any, step: int | None = None) -> Any:
        """Checkpoint `step` (default: the latest) restored into `state`'s structure and shardings.

        Without any checkpoint, `state` itself when no step was asked for.
        """
        if step is not None and step not in self.manager.all_steps():
            raise CheckpointError(f"No checkpoint of step {step} in {self.directory}; there are "
                                  f"{sorted(self.manager.all_steps())}.")
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return state
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:
            raise CheckpointError(f"Checkpoint {self.directory / str(step)} cannot be restored into the model of "
                                  f"this config ({type(error).__name__}: {error}). Remove it, or train in a new "
                                  f"workdir.") from error

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._sigterm

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()


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
      step: the checkpoint; None for the latest.
    """
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory)
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(f"No checkpoint in {directory}.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"No checkpoint of step {step} in {directory}; there are {steps}.")
    params, model_state = abstract_variables["params"], {k: v for k, v in abstract_variables.items() if k != "params"}
    # The train state's other fields (optimiser state, step) are left on disk.
    item = {"params": params, "model_state": model_state}
    try:
        restored = manager.restore(step, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    except Exception as error:
        raise CheckpointError(f"Checkpoint {directory / str(step)} cannot be restored into the model of this "
                              f"config ({type(error).__name__}: {error}).") from error
    return RestoredVariables(step, {"params": restored["params"], **restored["model_state"]})


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
