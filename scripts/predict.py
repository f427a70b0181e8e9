r"""Detects objects in image files with an inference export; writes detections JSON and PNGs.

    python -m scripts.predict --export_dir=/tmp/demo_export a.jpg b.png --out_dir=/tmp/predictions

Every path (export, images, output folder) may be a bucket (gs://...).
"""

import json

import tensorflow as tf
from absl import app, flags
from etils import epath

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
    missing = [path for path in paths if not epath.Path(path).exists()]
    if missing:
        raise app.UsageError(f"No such image file(s): {', '.join(missing)}")
    detector = Detector(_EXPORT_DIR.value)
    out_dir = epath.Path(_OUT_DIR.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [transforms.decode_image(epath.Path(path).read_bytes()).numpy() for path in paths]
    records = []
    for path, image, result in zip(paths, images, detector.predict_arrays(images)):
        records.append({"file": path, "detections": [
            {"bbox_xyxy": [float(v) for v in box], "score": float(score), "category_id": int(category_id),
             "category_name": name}
            for box, score, category_id, name in zip(result["boxes"], result["scores"], result["category_ids"],
                                                     result["category_names"])]})
        keep = result["scores"] >= _SCORE.value
        drawn = visualise.draw_boxes(image, result["boxes"][keep], result["labels"][keep])
        (out_dir / f"{epath.Path(path).stem}.png").write_bytes(tf.io.encode_png(drawn).numpy())
    (out_dir / "detections.json").write_text(json.dumps(records, indent=1))
    print(f"Wrote detections of {len(paths)} images to {_OUT_DIR.value}")


if __name__ == "__main__":
    app.run(main)
