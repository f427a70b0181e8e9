"""ImageNet-pretrained ResNet/ResNeXt weights from a torchvision ``state_dict`` (.pth, or an .npz of it).

torchvision names ``conv1``, ``bn1``, ``layer{s}.{i}.conv{j}``, ``layer{s}.{i}.bn{j}``,
``layer{s}.{i}.downsample.{0,1}`` map onto ``ResNet``'s ``conv1``, ``bn1``, ``layer{s}_{i}/...`` and
``downsample_conv``/``downsample_bn``; convolution kernels go from OIHW to HWIO. The .npz form
(``scripts/convert_torchvision.py``) needs no torch at run time. ResNeXt's grouped kernels
(``[O, I / groups, 3, 3]``) become flax's grouped HWIO kernels by the same transpose. A backbone with
DCNv2 stages takes the plain network's weights: the 3x3 kernels load into the deformable layers and
their offset predictors keep their initialisation (the official DCN models start this way).

Nothing in a file runs: ``.pth`` files load with torch's ``weights_only=True`` (tensors and plain
containers only), ``.npz`` files without pickled objects, Detectron's ``.pkl`` through
``atss_jax.safe_pickle``. ``fill_backbone`` is the part shared with ``caffe2_import``.
"""

from __future__ import annotations

import importlib.util
import io
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from atss_jax import errors

_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")
_BN_FIELDS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def load_state_dict(path: str | epath.PathLike) -> dict[str, np.ndarray]:
    """Reads a torchvision ``state_dict`` from ``.npz`` (no torch needed) or ``.pth``/``.pt``; ``path`` may be
    a bucket (``gs://...``): the bytes are read through etils.epath."""
    file = epath.Path(path)
    path = str(path)
    if not file.exists():
        raise errors.MissingFileError(f"pretrained backbone file {path!r} does not exist")
    # Imported here: caffe2_import builds on this module's fill_backbone.
    from atss_jax.models import caffe2_import

    if caffe2_import.is_caffe2_file(path):
        raise errors.WeightsFileError(f"{path!r} is a Detectron Caffe2 pickle, not a torchvision state_dict: it "
                                      "needs no conversion, set it as config.model.backbone.pretrained")
    data = io.BytesIO(file.read_bytes())
    if path.endswith(".npz"):
        try:
            with np.load(data, allow_pickle=False) as archive:  # object arrays would unpickle code
                return {key: archive[key] for key in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise errors.WeightsFileError(f"{path!r} is not a readable .npz state_dict: {error}") from error
    if importlib.util.find_spec("torch") is None:
        raise errors.MissingPackageError(
            f"reading {path!r} needs torch; convert it once with scripts/convert_torchvision.py to .npz")
    state = torch_load_weights(data, path)
    state = state.get("state_dict", state)
    return {key: value.detach().cpu().numpy() for key, value in state.items() if hasattr(value, "numpy")}


# Paragraphs of torch's refusal that give advice rather than the reason (among them: retry with
# weights_only=False, the one thing not to do with an untrusted file).
_TORCH_ADVICE = ("weights_only", "torch.load", "safe_globals")


class InertObject:
    """Stands in for an object of a checkpoint's training metadata (mmengine's ``HistoryBuffer`` in its
    ``message_hub``, numpy scalars in its ``meta``): built from any arguments, it keeps and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def __setstate__(self, state: Any) -> None:
        del state


# Globals of the metadata that training loops save beside the weights (mmdetection 3 / mmengine: the message
# hub's history buffers and numpy values, whose pickles also name builtins.getattr). They are read as
# InertObject, never as what they name; any other global is refused.
INERT_MODULES = ("mmengine.", "numpy.")
INERT_NAMES = ("builtins.getattr",)


def _metadata_globals(data: Any) -> list[str]:
    """The globals of the checkpoint that torch's weights_only loader refuses and that are training metadata."""
    import torch

    names = torch.serialization.get_unsafe_globals_in_checkpoint(data)
    if hasattr(data, "seek"):
        data.seek(0)
    return [name for name in names if name.startswith(INERT_MODULES) or name in INERT_NAMES]


def torch_load_weights(data: Any, path: str) -> Any:
    """``torch.load(data, weights_only=True)``: tensors and plain containers only, nothing from the file runs.
    The training metadata of a checkpoint written by mmdetection 3's loop (``INERT_MODULES``) loads as
    ``InertObject`` placeholders.

    Raises:
      errors.WeightsFileError: one line naming ``path`` and torch's reason (e.g. the global the file asks to
        run), without torch's advice or its traceback.
    """
    import torch

    try:
        inert = [(InertObject, name) for name in _metadata_globals(data)]
        with torch.serialization.safe_globals(inert):
            return torch.load(data, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated, foreign or code-carrying file
        paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
        reason = " ".join(p for p in paragraphs if not any(word in p for word in _TORCH_ADVICE))
        raise errors.WeightsFileError(
            f"{path!r} was refused and nothing from it was run: {reason or type(error).__name__} (a weights file "
            "holds tensors and plain containers only).") from None


def _module_path(torch_module: str) -> tuple[str, ...]:
    """``layer2.0.downsample.1`` -> ``("layer2_0", "downsample_bn")``; ``bn1`` -> ``("bn1",)``."""
    match = _BLOCK.match(torch_module)
    if not match:
        return (torch_module,)
    stage, index, rest = match.groups()
    rest = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(rest, rest)
    return (f"layer{stage}_{int(index)}", rest)


def convert_resnet(
    state_dict: Mapping[str, np.ndarray], backbone_variables: Mapping[str, Any], norm: str
) -> dict[str, dict]:
    """Torchvision ResNet weights -> the backbone's variable collections.

    Args:
      state_dict: torchvision names to arrays (``fc.*`` and ``num_batches_tracked`` are ignored).
      backbone_variables: the backbone's freshly initialised variables, e.g. ``{"params":
        variables["params"]["backbone"], "frozen": variables["frozen"]["backbone"]}``: their
        structure and shapes are what every converted array must match.
      norm: the backbone's norm, "frozen_bn" (statistics and affine into ``frozen``) or "bn"
        (affine into ``params``, statistics into ``batch_stats``).

    Returns:
      The same collections filled with the pretrained values.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped array (e.g. a ResNet-101 file for a
        ResNet-50 config).
    """
    arrays, problems = [], []
    for key, value in state_dict.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        module, field = key.rsplit(".", 1)
        if field == "weight" and value.ndim == 4:
            arrays.append((key, _module_path(module), "kernel", np.transpose(value, (2, 3, 1, 0))))
        elif field in _BN_FIELDS:
            arrays.append((key, _module_path(module), _BN_FIELDS[field], value))
        else:
            problems.append(f"unexpected {key}")
    return fill_backbone(arrays, backbone_variables, norm, problems)


def fill_backbone(
    arrays: Iterable[tuple[str, tuple[str, ...], str, np.ndarray]],
    backbone_variables: Mapping[str, Any],
    norm: str,
    problems: Sequence[str] = (),
    source_of: Callable[[tuple[str, ...]], str] | None = None,
) -> dict[str, dict]:
    """Pretrained arrays already in this project's layout -> the backbone's variable collections.

    The part every importer shares (torchvision here, Detectron's Caffe2 pickles in ``caffe2_import``):
    placing each array by norm kind, checking its shape, and listing what is missing.

    Args:
      arrays: ``(source name, module path, leaf, value)``: the name in the file (for messages), the path
        in ``ResNet`` (``("layer2_0", "conv1")``), the leaf (``"kernel"`` as HWIO, or a norm's
        ``"scale"``, ``"bias"``, ``"mean"``, ``"var"``) and the array.
      backbone_variables, norm: as for ``convert_resnet``.
      problems: the caller's own findings (e.g. unknown names), reported with these.
      source_of: the name in the file that a missing ``(module path..., leaf)`` would have had, for
        messages; by default the variable's path.

    Returns:
      ``backbone_variables``' collections filled with the arrays (float32); DCNv2 offset predictors, absent
      from ImageNet weights, keep their initial values.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped array.
    """
    if norm not in ("frozen_bn", "bn"):
        raise ValueError(f"ImageNet weights exist for BatchNorm backbones, not for norm={norm!r}")
    new = {collection: {} for collection in backbone_variables}
    problems, filled = list(problems), set()
    for source, path, leaf, value in arrays:
        if leaf == "kernel":
            collection = "params"
        elif norm == "frozen_bn":
            collection = "frozen"
        else:
            collection = "params" if leaf in ("scale", "bias") else "batch_stats"
        target = backbone_variables.get(collection, {})
        for part in path:
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        expected = target.get(leaf) if isinstance(target, Mapping) else None
        if expected is None:
            problems.append(f"unexpected {source}")
            continue
        if tuple(expected.shape) != tuple(value.shape):
            problems.append(f"{source}: shape {tuple(value.shape)} does not fit {tuple(expected.shape)}")
            continue
        set_leaf(new[collection], (*path, leaf), value)
        filled.add((collection, *path, leaf))
    for collection, tree in backbone_variables.items():
        for path, initial in leaves(tree):
            if (collection, *path) in filled:
                continue
            if "conv_offset" in path:  # DCNv2 offset predictors are not in ImageNet weights: kept as initialised
                set_leaf(new[collection], path, initial)
            else:
                problems.append(f"missing {source_of(path) if source_of else collection + '/' + '/'.join(path)}")
    if problems:
        raise errors.WeightsFileError(
            "pretrained backbone does not match the model: " + "; ".join(sorted(set(problems))[:20]))
    return new


def leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, value) of every leaf of a nested mapping."""
    found = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            found.extend(leaves(value, (*prefix, key)))
        else:
            found.append(((*prefix, key), value))
    return found


def set_leaf(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """``tree[path[0]][path[1]]... = value`` as float32, creating the intermediate dicts."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = np.asarray(value, np.float32)


def load_pretrained_backbone(variables: Mapping[str, Any], path: str, norm: str) -> dict[str, Any]:
    """``variables`` of the detector with the backbone replaced by the weights in ``path``: a torchvision
    ``state_dict`` (.npz, .pth) or a Detectron Caffe2 pickle (.pkl, ``caffe2_import``)."""
    # Imported here: caffe2_import builds on this module's fill_backbone.
    from atss_jax.models import caffe2_import

    backbone = {name: tree["backbone"] for name, tree in variables.items() if "backbone" in tree}
    if caffe2_import.is_caffe2_file(path):
        converted = caffe2_import.convert_caffe2(caffe2_import.load_blobs(path), backbone, norm)
    else:
        converted = convert_resnet(load_state_dict(path), backbone, norm)
    return {
        name: {**tree, **({"backbone": converted[name]} if name in converted else {})}
        for name, tree in variables.items()
    }
