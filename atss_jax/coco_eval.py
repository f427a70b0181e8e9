"""COCO box evaluation: the ground truth (the original annotation JSON), pycocotools metrics, host merge.

Detections leave the device in original-image pixels with label indices; `detections_to_coco` turns
them into COCO results (xywh, category ids, clipped to the original image). Each host writes its
part to the workdir; process 0 merges them and runs pycocotools.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Sequence

import faster_coco_eval
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from atss_jax import errors
from atss_jax.data import pipeline

# COCOeval.stats, in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def ground_truth(split: pipeline.Split, annotations_file: str = "") -> dict:
    """The COCO ground truth to score detections on ``split`` against, the first that exists of:

    1. ``annotations_file`` (``config.eval.annotations_file``), as given;
    2. the split's original annotation JSON, recorded beside the dataset when it was prepared
       (``split.annotations_path``, `coco.record_annotations`): the numbers are pycocotools' on that file;
    3. built from the split (`ground_truth_from_split`), with a warning, for a dataset prepared before the
       JSON was recorded (or TFDS's COCO whose downloads were not found).

    Raises:
      ValueError: the recorded JSON does not describe the split (other images or categories).
    """
    if annotations_file:
        return load_ground_truth(annotations_file)
    path = split.annotations_path
    if path.exists():
        recorded = load_ground_truth(str(path))
        category_ids = sorted(c["id"] for c in recorded["categories"])
        if len(recorded["images"]) != split.num_examples or category_ids != sorted(split.category_ids):
            raise errors.ConfigError(
                f"The annotations {path} recorded for split {split.name!r} of {split.builder.info.full_name!r} "
                f"do not describe it: {len(recorded['images'])} images and category ids {category_ids}, but the "
                f"split has {split.num_examples} images and category ids {sorted(split.category_ids)}. Delete the "
                "file and run `python -m scripts.prepare_data` again, or set config.eval.annotations_file.")
        return recorded
    logging.warning(
        "Evaluating %s split %r against ground truth built from the split: no annotation JSON is recorded beside "
        "the dataset (%s is missing; it was prepared before they were recorded). The numbers can differ from "
        "pycocotools' on the original JSON: the split keeps areas as integers (an object of area just above "
        "32^2 or 96^2 counts in the wrong size classes) and boxes clipped to the image. To get them exactly, run "
        "`python -m scripts.prepare_data` with the same config again (it records the JSON; for TFDS's COCO, "
        "from its downloads in <data_dir>/downloads) or set config.eval.annotations_file.",
        split.builder.info.full_name, split.name, path)
    return ground_truth_from_split(split)


def ground_truth_from_split(split: pipeline.Split) -> dict:
    """A COCO ground-truth dict built from a TFDS split: `ground_truth`'s fallback for a dataset prepared
    without its annotation JSON recorded.

    Crowd boxes stay (`iscrowd=1`, so detections on them are ignored, as in the official evaluation)
    and `area` is the dataset's area field (COCO's segment area decides small/medium/large, not the
    box area), so on whole-number areas and boxes inside their images the numbers equal pycocotools' on
    the original JSON (tests/test_data_coco.py). Otherwise they can differ: the split stores `area` as an
    integer (TFDS's `coco/2017` and the `coco_format` builder truncate it), so an object of area in
    (1024, 1025) or (9216, 9217) counts in both neighbouring size classes (pycocotools' ranges include their
    ends) instead of the larger one, and boxes as float32 fractions clipped to the image (`coco_format`;
    TFDS's builder rejects boxes overhanging the image).
    """
    category_ids = split.category_ids
    sizes = split.image_sizes()
    records = tf.data.Dataset.range(split.num_examples).map(
        lambda i: {k: v for k, v in split.read(i).items() if k in ("image/id", "objects")},
        num_parallel_calls=tf.data.AUTOTUNE)
    images, annotations = [], []
    for (height, width), record in zip(sizes, records.as_numpy_iterator()):
        image_id = int(record["image/id"])
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        objects = record["objects"]
        for ann_id, area, (ymin, xmin, ymax, xmax), label, crowd in zip(
                objects["id"], objects["area"], objects["bbox"], objects["label"], objects["is_crowd"]):
            x, y = float(xmin) * width, float(ymin) * height
            annotations.append({
                "id": int(ann_id), "image_id": image_id, "category_id": category_ids[int(label)],
                "bbox": [x, y, float(xmax) * width - x, float(ymax) * height - y],
                "area": float(area), "iscrowd": int(crowd),
            })
    _renumber_duplicate_ids(annotations)
    categories = [{"id": c, "name": str(c)} for c in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories}


def _renumber_duplicate_ids(annotations: list[dict]) -> None:
    """pycocotools needs unique annotation ids; datasets without them (id 0 everywhere) get new ones."""
    if len({a["id"] for a in annotations}) != len(annotations):
        for i, annotation in enumerate(annotations, start=1):
            annotation["id"] = i


def load_ground_truth(path: str) -> dict:
    with epath.Path(path).open() as f:
        return json.load(f)


def detections_to_coco(image_ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                       valid: np.ndarray, original_sizes: np.ndarray, category_ids: Sequence[int]) -> list[dict]:
    """Device detections -> COCO results.

    Args:
      image_ids: [N] int; boxes: [N, D, 4] xyxy original pixels; scores: [N, D]; classes: [N, D] label
      indices; valid: [N, D] bool; original_sizes: [N, 2] (height, width).
    """
    results = []
    for image_id, image_boxes, image_scores, image_classes, image_valid, (height, width) in zip(
            image_ids, boxes, scores, classes, valid, original_sizes):
        clipped = np.clip(image_boxes, 0, [width, height, width, height])
        for (x1, y1, x2, y2), score, label in zip(clipped[image_valid], image_scores[image_valid],
                                                  image_classes[image_valid]):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                            "score": float(score)})
    return results


# "pycocotools" (the official code) or "faster_coco_eval" (a C++ port with the same numbers; see
# scripts/benchmark_eval.py for the check and the speed-up).
EVALUATORS = ("pycocotools", "faster_coco_eval")


def coco_metrics(ground_truth: dict, detections: list[dict],
                 evaluator: str = "faster_coco_eval") -> tuple[dict[str, float], dict[int, float]]:
    """COCO box metrics.

    Returns:
      (the 12 COCO numbers by name, AP per category id). With no detections at all every number is 0.
    """
    if evaluator not in EVALUATORS:
        raise errors.ConfigError(f"evaluator={evaluator!r} is not one of {EVALUATORS}")
    if not detections:
        return dict.fromkeys(METRIC_NAMES, 0.0), {c["id"]: 0.0 for c in ground_truth["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        if evaluator == "pycocotools":
            coco = COCO()
            coco.dataset = copy.deepcopy(ground_truth)
            coco.createIndex()
            evaluation = COCOeval(coco, coco.loadRes(copy.deepcopy(detections)), "bbox")
        else:
            coco = faster_coco_eval.COCO(copy.deepcopy(ground_truth))
            evaluation = faster_coco_eval.COCOeval_faster(coco, coco.loadRes(copy.deepcopy(detections)), "bbox",
                                                          print_function=lambda *args: None)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = dict(zip(METRIC_NAMES, (float(s) for s in evaluation.stats)))
    # precision: [IoU thresholds, recall points, categories, area ranges, max detections]; -1 = no data.
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, category_id in enumerate(evaluation.params.catIds):
        values = precision[:, :, k]
        values = values[values > -1]
        per_class[int(category_id)] = float(values.mean()) if values.size else float("nan")
    return stats, per_class


def format_table(stats: dict[str, float], per_class: dict[int, float], names: dict[int, str]) -> str:
    """The 12 numbers and the per-class AP as Markdown tables."""
    lines = ["| " + " | ".join(METRIC_NAMES) + " |", "|" + "---|" * len(METRIC_NAMES),
             "| " + " | ".join(f"{100 * stats[m]:.1f}" for m in METRIC_NAMES) + " |", "",
             "| category | AP |", "|---|---|"]
    lines += [f"| {names.get(c, c)} | {100 * ap:.1f} |" for c, ap in per_class.items()]
    return "\n".join(lines)


def write_host_detections(directory: str, process_index: int, detections: list[dict]) -> None:
    """Writes (replaces) this host's detections whole: written beside and renamed into place, so that an
    evaluation stopped midway (preemption) leaves the previous file or none, never a partial one."""
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    partial = path / f"detections_host{process_index}.json.partial"
    partial.write_text(json.dumps(detections))
    partial.replace(path / f"detections_host{process_index}.json")


def merge_host_detections(directory: str, process_count: int) -> list[dict]:
    """All hosts' detections (each host wrote `detections_host<i>.json`)."""
    merged = []
    for process_index in range(process_count):
        path = epath.Path(directory) / f"detections_host{process_index}.json"
        if not path.exists():
            raise FileNotFoundError(f"Host {process_index} wrote no detections to {path}.")
        try:
            merged += json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is corrupt ({error}); evaluate again to rewrite it.") from None
    return merged


def save_json(path: str | epath.Path, value) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
