r"""Detects objects in images with an inference export; writes COCO-format results, a per-file JSON and pictures.

    python -m scripts.predict --export_dir=/tmp/demo_export photos/ 'more/*.jpg' a.png --out_dir=/tmp/predictions
    python -m scripts.predict --export_dir=/tmp/demo_export photos/ --out_dir=/tmp/predictions --tta

Inputs are files, folders (their .jpg/.jpeg/.png/.bmp/.gif files, recursively) and globs. Each output is
named after its image's path relative to the inputs' common folder (`a/x.jpg` -> `a/x.jpg.png`), so no two
outputs collide; a run that would write over any input stops before any work. What an earlier run wrote into
--out_dir (its JSONs, pictures named `<image>.<ext>.png`) is never read as an input, so --out_dir may lie
inside an input folder and the same command may run again. In --out_dir:

  coco_results.json   COCO results format: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]
  coco_images.json    the ids: {"images": [{"id", "file_name", "height", "width"}], "categories": [...]}
  detections.json     per file: its detections (xyxy boxes) or why it could not be read
  <file>.png          each image with its detections above --draw_score_threshold

Images are decoded batch by batch (memory does not grow with the folder) and batched over the local
devices. A file that cannot be read or decoded is reported by name and skipped; the others are written and
the exit status is 1. --tta merges the views of the export's config.eval.tta (atss_jax/tta.py). Every path
(export, images, output folder) may be a bucket (gs://...).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow as tf
from absl import flags
from etils import epath

from atss_jax import cli, errors, visualise
from atss_jax.data import transforms
from atss_jax.serving import Detector

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "An export written by scripts/export.py.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the results and the pictures.")
_SCORE = flags.DEFINE_float("draw_score_threshold", 0.3, "Detections drawn in the pictures score at least this.")
_BATCH = flags.DEFINE_integer("batch_per_device", 4, "Images per device per call (and decoded at a time).")
_TTA = flags.DEFINE_bool("tta", False, "Test-time augmentation: the views of the export's config.eval.tta.")
_DRAW = flags.DEFINE_bool("draw", True, "Write the pictures.")
flags.mark_flags_as_required(["export_dir", "out_dir"])

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
RESULT_FILES = ("coco_results.json", "coco_images.json", "detections.json")
PICTURE_SUFFIX = ".png"


class Refused(errors.Refusal, ValueError):
    """A command line predict cannot carry out; the message names the arguments to change (printed alone)."""


def _absolute(path: epath.Path) -> epath.Path:
    return path if "://" in str(path) else path.resolve()


def expand_inputs(arguments: Sequence[str]) -> list[epath.Path]:
    """Files, folders (their image files, recursively) and globs -> distinct absolute files, in argument order.

    Raises:
      Refused: naming an argument that is no file, a folder without images, or a glob without matches.
    """
    files, problems = {}, []
    for argument in arguments:
        glob_at = min((argument.find(c) for c in "*?[" if c in argument), default=-1)
        if glob_at >= 0:
            cut = argument.rfind("/", 0, glob_at)  # the folder part before the first wildcard
            matches = sorted(p for p in epath.Path(argument[:cut + 1] or ".").glob(argument[cut + 1:]) if p.is_file())
            problem = f"{argument}: no file matches"
        elif (path := epath.Path(argument)).is_dir():
            matches = sorted(root / name for root, _, names in path.walk() for name in names
                             if epath.Path(name).suffix.lower() in IMAGE_SUFFIXES)
            problem = f"{argument}: a folder without {'/'.join(IMAGE_SUFFIXES)} files"
        else:
            matches = [path] if path.is_file() else []
            problem = f"{argument}: no such file"
        if not matches:
            problems.append(problem)
        files.update((str(_absolute(p)), _absolute(p)) for p in matches)
    if problems:
        raise Refused("; ".join(problems))
    return list(files.values())


def is_earlier_output(path: epath.Path, out_dir: epath.Path) -> bool:
    """Whether `path` (absolute) is a file predict writes into `out_dir`: a result JSON, or a picture named
    `<image>.<ext>.png`."""
    if not str(path).startswith(str(out_dir).rstrip("/") + "/"):
        return False
    name = path.name
    return name in RESULT_FILES or (name.endswith(PICTURE_SUFFIX) and
                                    epath.Path(name[:-len(PICTURE_SUFFIX)]).suffix.lower() in IMAGE_SUFFIXES)


def output_names(files: Sequence[epath.Path]) -> list[str]:
    """Each file's path relative to the files' deepest common folder ('/'-separated): distinct for distinct
    files, so outputs named after them never collide."""
    parents = [f.parent.parts for f in files]
    common = 0
    while all(len(p) > common and p[common] == parents[0][common] for p in parents):
        common += 1
    return ["/".join(f.parts[common:]) for f in files]


def plan_outputs(files: Sequence[epath.Path], out_dir: epath.Path, draw: bool) -> tuple[list[str], list[epath.Path]]:
    """(output names, picture paths) of `files`.

    Raises:
      Refused: an output would replace an input.
    """
    names = output_names(files)
    pictures = [out_dir / f"{name}{PICTURE_SUFFIX}" for name in names]
    inputs = {str(f) for f in files}
    outputs = [out_dir / name for name in RESULT_FILES] + (pictures if draw else [])
    clashes = sorted(str(o) for o in outputs if str(_absolute(o)) in inputs)
    if clashes:
        raise Refused(f"Refusing to write over input file(s): {', '.join(clashes)}. Choose another --out_dir.")
    return names, pictures


def _read(path: epath.Path) -> np.ndarray:
    return transforms.decode_image(path.read_bytes()).numpy()


def predict(detector: Detector, files: Sequence[epath.Path], out_dir: epath.Path, draw_score_threshold: float,
            draw: bool = True) -> list[tuple[str, str]]:
    """Detects in `files` batch by batch and writes the results (module docstring) into `out_dir`.

    Returns:
      (file, error) of each file that could not be read or decoded; the others' results are written.
    """
    names, pictures = plan_outputs(files, out_dir, draw)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, coco_results, coco_images, failures = [], [], [], []
    for start in range(0, len(files), detector.batch_size):
        images, indices = [], []
        for index in range(start, min(start + detector.batch_size, len(files))):
            try:
                images.append(_read(files[index]))
                indices.append(index)
            except (OSError, ValueError, tf.errors.OpError) as error:
                message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                failures.append((str(files[index]), message))
                records.append({"file": str(files[index]), "error": message})
                print(f"predict: cannot read {files[index]}: {message}", file=sys.stderr)
        for index, image, result in zip(indices, images, detector.predict_arrays(images)):
            image_id = index + 1
            coco_images.append({"id": image_id, "file_name": names[index], "height": int(image.shape[0]),
                                "width": int(image.shape[1])})
            boxes = [[float(v) for v in box] for box in result["boxes"]]
            coco_results += [{"image_id": image_id, "category_id": int(category_id),
                              "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
                             for (x1, y1, x2, y2), score, category_id in zip(boxes, result["scores"],
                                                                             result["category_ids"])]
            records.append({"file": str(files[index]), "image_id": image_id, "detections": [
                {"bbox_xyxy": box, "score": float(score), "category_id": int(category_id), "category_name": name}
                for box, score, category_id, name in zip(boxes, result["scores"], result["category_ids"],
                                                         result["category_names"])]})
            if draw:
                keep = result["scores"] >= draw_score_threshold
                drawn = visualise.draw_boxes(image, result["boxes"][keep], result["labels"][keep])
                pictures[index].parent.mkdir(parents=True, exist_ok=True)
                pictures[index].write_bytes(tf.io.encode_png(drawn).numpy())
    categories = [{"id": i, "name": n} for i, n in zip(detector.category_ids, detector.category_names)]
    (out_dir / "coco_results.json").write_text(json.dumps(coco_results))
    (out_dir / "coco_images.json").write_text(json.dumps({"images": coco_images, "categories": categories}, indent=1))
    (out_dir / "detections.json").write_text(json.dumps(records, indent=1))
    return failures


def main(argv):
    if len(argv) < 2:
        raise Refused("Give at least one image file, folder or glob.")
    out_dir = _absolute(epath.Path(_OUT_DIR.value))
    files = [f for f in expand_inputs(argv[1:]) if not is_earlier_output(f, out_dir)]
    if not files:
        raise Refused(f"Every input is a file an earlier run wrote into --out_dir={_OUT_DIR.value}.")
    plan_outputs(files, out_dir, _DRAW.value)  # refuse before loading the model
    detector = Detector(_EXPORT_DIR.value, batch_size=_BATCH.value * jax.local_device_count(), use_tta=_TTA.value)
    failures = predict(detector, files, out_dir, _SCORE.value, _DRAW.value)
    print(f"Wrote detections of {len(files) - len(failures)} of {len(files)} images to {_OUT_DIR.value}")
    if failures:
        print(f"predict: {len(failures)} file(s) could not be read: {', '.join(f for f, _ in failures)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main, "predict")
