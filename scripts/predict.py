r"""Detects objects in image files with an inference export; writes detections JSON and PNGs.

    python -m scripts.predict --export_dir=/tmp/demo_export a.jpg b.png --out_dir=/tmp/predictions
"""

import json
import os

import tensorflow as tf
from absl import app, flags

from atss_jax import visualise
from atss_jax.data import transforms
from atss_jax.serving import Detector

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "An export written by scripts/export.py.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write detections.json and the PNGs.")
_SCORE = flags.DEFINE_float("draw_score_threshold", 0.3, "Detections drawn in the PNGs score at least this.")
flags.mark_flags_as_required(["export_dir", "out_dir"])


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give at least one image file.")
    detector = Detector(_EXPORT_DIR.value)
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    records = []
    for path, result in zip(paths, detector.predict_files(paths)):
        records.append({"file": path, "detections": [
            {"bbox_xyxy": [float(v) for v in box], "score": float(score), "category_id": int(category_id),
             "category_name": name}
            for box, score, category_id, name in zip(result["boxes"], result["scores"], result["category_ids"],
                                                     result["category_names"])]})
        image = transforms.decode_image(tf.io.read_file(path)).numpy()
        keep = result["scores"] >= _SCORE.value
        drawn = visualise.draw_boxes(image, result["boxes"][keep], result["labels"][keep])
        name = os.path.splitext(os.path.basename(path))[0]
        tf.io.write_file(os.path.join(_OUT_DIR.value, f"{name}.png"), tf.io.encode_png(drawn))
    with open(os.path.join(_OUT_DIR.value, "detections.json"), "w") as f:
        json.dump(records, f, indent=1)
    print(f"Wrote detections of {len(paths)} images to {_OUT_DIR.value}")


if __name__ == "__main__":
    app.run(main)
