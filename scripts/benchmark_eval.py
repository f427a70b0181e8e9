r"""COCO box evaluation time: pycocotools vs faster-coco-eval on the same synthetic ground truth and
detections (COCO-like: 80 categories, ~7 boxes per image, 100 detections per image), checking that
the 12 numbers and the per-class APs are identical.

    python -m scripts.benchmark_eval [--num_images=5000] [--repeats=1]
"""

import time

import numpy as np
from absl import app, flags

from atss_jax import coco_eval
from atss_jax.data.coco import COCO_CATEGORY_IDS

_NUM_IMAGES = flags.DEFINE_integer("num_images", 5000, "Images (COCO val2017 has 5000).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs per evaluator, interleaved (median reported).")


def synthetic_coco(num_images: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth with COCO's size mix and crowd boxes, and detections: jittered true boxes plus clutter."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        height, width = (480, 640) if rng.random() < 0.75 else (640, 480)
        images.append({"id": image_id, "height": height, "width": width})
        boxes = []
        for _ in range(rng.poisson(7)):
            w = np.exp(rng.uniform(np.log(6), np.log(width * 0.9)))
            h = np.exp(rng.uniform(np.log(6), np.log(height * 0.9)))
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = int(rng.choice(COCO_CATEGORY_IDS))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h * rng.uniform(0.5, 1.0),
                                "iscrowd": int(rng.random() < 0.01)})
            boxes.append((x, y, w, h, category))
        for i in range(100):
            if i < len(boxes) and rng.random() < 0.8:
                x, y, w, h, category = boxes[i]
                x, y = x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h)
                w, h = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
                score = rng.uniform(0.3, 1.0)
            else:
                w, h = rng.uniform(8, width / 2), rng.uniform(8, height / 2)
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                category, score = int(rng.choice(COCO_CATEGORY_IDS)), rng.uniform(0, 0.5)
            detections.append({"image_id": image_id, "category_id": category, "bbox": [x, y, w, h], "score": score})
    categories = [{"id": c, "name": str(c)} for c in COCO_CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def main(argv):
    del argv
    ground_truth, detections = synthetic_coco(_NUM_IMAGES.value)
    times = {e: [] for e in coco_eval.EVALUATORS}
    results = {}
    for _ in range(_REPEATS.value):
        for evaluator in coco_eval.EVALUATORS:
            start = time.perf_counter()
            results[evaluator] = coco_eval.coco_metrics(ground_truth, detections, evaluator)
            times[evaluator].append(time.perf_counter() - start)
    (ref_stats, ref_classes), (fast_stats, fast_classes) = (results[e] for e in coco_eval.EVALUATORS)
    stat_diff = max(abs(ref_stats[k] - fast_stats[k]) for k in ref_stats)
    class_diff = max(abs(ref_classes[k] - fast_classes[k]) for k in ref_classes)
    baseline = float(np.median(times["pycocotools"]))
    print(f"\nCOCO box evaluation, {_NUM_IMAGES.value} images, {len(ground_truth['annotations'])} boxes, "
          f"{len(detections)} detections; median of {_REPEATS.value}.")
    print("| evaluator | seconds | speed-up | AP |\n|---|---:|---:|---:|")
    for evaluator in coco_eval.EVALUATORS:
        seconds = float(np.median(times[evaluator]))
        print(f"| {evaluator} | {seconds:.1f} | {baseline / seconds:.1f}x | {results[evaluator][0]['AP']:.4f} |")
    print(f"\nLargest difference: {stat_diff:.2e} over the 12 numbers, {class_diff:.2e} over per-class APs "
          f"({'identical' if stat_diff == 0 and class_diff < 1e-12 else 'NOT identical'}).")


if __name__ == "__main__":
    app.run(main)
