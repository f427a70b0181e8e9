r"""Converts a torchvision ResNet or ResNeXt checkpoint (.pth) into an .npz state_dict, so training needs no torch.

python -m scripts.convert_torchvision resnet50-0676ba61.pth resnet50.npz
python -m scripts.convert_torchvision resnext101_32x8d-8ba56ff5.pth gs://bucket/weights/x101_32x8d.npz

The files named are torchvision's IMAGENET1K_V1 weights (the original recipe, as mmdetection's ATSS used);
either path may be a bucket (gs://...). The .pth is read with torch's weights_only=True: no code from the
file runs. Detectron's Caffe2 pickles (R-50.pkl, ...) need no conversion: set them as
config.model.backbone.pretrained directly.
"""

import io

import numpy as np
from absl import app
from etils import epath

from atss_jax import cli
from atss_jax.models.torchvision_import import load_state_dict


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise app.UsageError("usage: python -m scripts.convert_torchvision SOURCE.pth OUT.npz (--help explains)")
    state = load_state_dict(argv[1])
    out = epath.Path(argv[2] if argv[2].endswith(".npz") else argv[2] + ".npz")  # as np.savez names a path
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    out.parent.mkdir(parents=True, exist_ok=True)  # e.g. /data/weights/ on a fresh machine
    out.write_bytes(buffer.getvalue())
    print(f"wrote {len(state)} arrays to {out}")


if __name__ == "__main__":
    cli.run(main, "convert_torchvision")
