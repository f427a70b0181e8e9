"""Detectron Caffe2 pickles (blob names and shapes of MSRA R-50/R-101 and FAIR X-101) load into the backbone and give
the features of a Caffe2-style ResNet written here in torch from the same blobs (BGR input with Detectron's means,
AffineChannel norms, the stride in the 1x1 for MSRA)."""

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from atss_jax import safe_pickle  # noqa: E402
from atss_jax.models.caffe2_import import convert_caffe2, load_blobs  # noqa: E402
from atss_jax.models.detector import build_backbone  # noqa: E402
from atss_jax.models.torchvision_import import load_pretrained_backbone  # noqa: E402
from configs import base  # noqa: E402
from tests.test_safe_pickle import python2_pickle  # noqa: E402

STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# Detectron's INPUT.PIXEL_MEAN (B, G, R), std 1 (official atss_core/config/defaults.py).
DETECTRON_MEAN_BGR = np.array([102.9801, 115.9465, 122.7717], np.float32)


def detectron_shapes(depth, groups=1, width_per_group=64, width=64):
    """Blob name -> shape of Detectron's ImageNet ResNet/ResNeXt pickles (conv weights OIHW, grouped ones
    ``[O, I / groups, 3, 3]``; every norm an AffineChannel ``_s``/``_b``), with ``width`` stem channels."""
    shapes = {"conv1_w": (width, 3, 7, 7), "res_conv1_bn_s": (width,), "res_conv1_bn_b": (width,)}
    channels = width
    for stage, blocks in enumerate(STAGES[depth]):
        inner, out = int(width * 2**stage * width_per_group / 64) * groups, 4 * width * 2**stage
        for index in range(blocks):
            name = f"res{stage + 2}_{index}"
            convs = {"branch2a": (inner, channels, 1, 1), "branch2b": (inner, inner // groups, 3, 3),
                     "branch2c": (out, inner, 1, 1)}
            if index == 0:
                convs["branch1"] = (out, channels, 1, 1)
            for branch, shape in convs.items():
                shapes[f"{name}_{branch}_w"] = shape
                shapes[f"{name}_{branch}_bn_s"] = shapes[f"{name}_{branch}_bn_b"] = (shape[0],)
            channels = out
    return shapes


def random_blobs(shapes, seed):
    """He-scaled kernels and trained-looking affines."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for name, shape in shapes.items():
        if name.endswith("_w"):
            blobs[name] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        else:
            low, high = (0.3, 1.0) if name.endswith("_s") else (-0.2, 0.2)
            blobs[name] = (rng.random(shape, np.float32) * (high - low) + low).astype(np.float32)
    return blobs


def caffe2_resnet(blobs, image, depth, groups, stride_in_1x1):
    """The official ResNet body (atss_core/modeling/backbone/resnet.py with FrozenBatchNorm2d of variance 1,
    no epsilon), functional torch on Caffe2 blob names: ``image [B, 3, H, W]`` -> C3, C4, C5 as NCHW numpy."""
    w = {name: torch.from_numpy(value) for name, value in blobs.items()}

    def affine(x, name):
        return x * w[name + "_s"][None, :, None, None] + w[name + "_b"][None, :, None, None]

    with torch.no_grad():
        x = F.relu(affine(F.conv2d(torch.from_numpy(image), w["conv1_w"], stride=2, padding=3), "res_conv1_bn"))
        x = F.max_pool2d(x, 3, 2, 1)
        outputs = []
        for stage, blocks in enumerate(STAGES[depth]):
            for index in range(blocks):
                name = f"res{stage + 2}_{index}"
                stride = 2 if stage > 0 and index == 0 else 1
                stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
                y = F.relu(affine(F.conv2d(x, w[name + "_branch2a_w"], stride=stride_1x1), name + "_branch2a_bn"))
                y = F.relu(affine(F.conv2d(y, w[name + "_branch2b_w"], stride=stride_3x3, padding=1, groups=groups),
                                  name + "_branch2b_bn"))
                y = affine(F.conv2d(y, w[name + "_branch2c_w"]), name + "_branch2c_bn")
                if name + "_branch1_w" in w:
                    x = affine(F.conv2d(x, w[name + "_branch1_w"], stride=stride), name + "_branch1_bn")
                x = F.relu(x + y)
            outputs.append(x.numpy())
    return outputs[1:]


def bgr_input(seed, size=64):
    """A uint8 RGB picture as Detectron feeds it: BGR, minus its means, std 1: ``[1, 3, size, size]``."""
    rgb = np.random.default_rng(seed).integers(0, 256, (1, size, size, 3)).astype(np.float32)
    return (rgb[..., ::-1] - DETECTRON_MEAN_BGR).transpose(0, 3, 1, 2).copy()


def backbone(stride_in_1x1, **fields):
    config = base.get_config().model.backbone
    config.update(fields, stride_in_1x1=stride_in_1x1)
    return build_backbone(config, jnp.float32)


def shapes_of(model, image):
    """The backbone's variables as shapes: a pretrained file fills every one of them."""
    return jax.eval_shape(model.init, jax.random.key(0), image)


def assert_features_match(got, expected):
    for level, (g, e) in enumerate(zip(got, expected)):
        e = e.transpose(0, 2, 3, 1)
        assert g.shape == e.shape, level
        relative = np.linalg.norm(np.asarray(g) - e) / np.linalg.norm(e)
        assert relative < 1e-4, (level, relative)


def test_msra_r50_python2_pickle_matches_the_caffe2_network(tmp_path):
    """The real R-50.pkl layout (Python 2 pickle, ``blobs``, the classifier, a stray ``conv1_b``, solver state),
    stride in the 1x1, frozen norms, through the detector's loading function."""
    blobs = random_blobs(detectron_shapes(50), seed=0)
    extras = {"fc1000_w": np.ones((1000, 2048), np.float32), "fc1000_b": np.ones(1000, np.float32),
              "conv1_b": np.full(64, 1e-9, np.float32),
              "res2_0_branch2a_w_momentum": np.ones((64, 64, 1, 1), np.float32)}
    path = tmp_path / "R-50.pkl"
    path.write_bytes(python2_pickle({**blobs, **extras}))
    image = bgr_input(0)
    expected = caffe2_resnet(blobs, image, 50, 1, stride_in_1x1=True)

    model = backbone(True, depth=50, norm="frozen_bn")
    nhwc = jnp.asarray(image.transpose(0, 2, 3, 1))
    loaded = load_pretrained_backbone({name: {"backbone": tree} for name, tree in shapes_of(model, nhwc).items()},
                                      str(path), "frozen_bn")
    variables = {name: tree["backbone"] for name, tree in loaded.items()}
    assert_features_match(jax.jit(model.apply)(variables, nhwc), expected)
    # The stride's place matters: the same blobs with the stride on the 3x3 give other features.
    misplaced = caffe2_resnet(blobs, image, 50, 1, stride_in_1x1=False)[0]
    assert np.linalg.norm(misplaced - expected[0]) > 0.1 * np.linalg.norm(expected[0])


def test_fair_resnext_pickle_into_trainable_bn(tmp_path):
    """FAIR's X-101 layout (grouped 3x3 holding the stride, ``pred_*`` classifier, bare blob dict, Python 3
    pickle) at depth 50 and a quarter of the width, into trainable BN evaluated with its running statistics."""
    groups, width_per_group, width = 32, 8, 16
    blobs = random_blobs(detectron_shapes(50, groups, width_per_group, width), seed=1)
    path = tmp_path / "X.pkl"
    path.write_bytes(pickle.dumps({**blobs, "pred_w": np.ones((1000, 4 * 8 * width), np.float32),
                                   "pred_b": np.ones(1000, np.float32)}, protocol=4))
    image = bgr_input(1)
    expected = caffe2_resnet(blobs, image, 50, groups, stride_in_1x1=False)

    model = backbone(False, depth=50, norm="bn", groups=groups, width_per_group=width_per_group, width=width)
    nhwc = jnp.asarray(image.transpose(0, 2, 3, 1))
    variables = convert_caffe2(load_blobs(str(path)), shapes_of(model, nhwc), "bn")
    np.testing.assert_array_equal(variables["params"]["layer3_0"]["bn2"]["scale"], blobs["res4_0_branch2b_bn_s"])
    assert not np.any(variables["batch_stats"]["layer3_0"]["bn2"]["mean"])
    assert_features_match(jax.jit(model.apply)(variables, nhwc), expected)


@pytest.mark.parametrize("depth,groups,width_per_group,stride_in_1x1", [
    (101, 1, 64, True),  # MSRA R-101.pkl
    (101, 32, 8, False),  # FAIR X-101-32x8d.pkl
    (101, 64, 4, False),  # FAIR X-101-64x4d.pkl
])
def test_full_size_files_fill_every_variable(depth, groups, width_per_group, stride_in_1x1):
    """Every blob of the full-size files has its variable and the right shape (shapes only: the blobs are
    broadcast zeros, the variables ``jax.eval_shape``'s)."""
    shapes = shapes_of(backbone(stride_in_1x1, depth=depth, groups=groups, width_per_group=width_per_group),
                       jnp.zeros((1, 64, 64, 3)))
    blobs = {name: np.broadcast_to(np.float32(0), shape) for name, shape in
             detectron_shapes(depth, groups, width_per_group).items()}
    variables = convert_caffe2(blobs, shapes, "frozen_bn")
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda leaf: leaf.shape, shapes)


def _small_model_and_blobs():
    variables = shapes_of(backbone(True, depth=50, width=16), jnp.zeros((1, 32, 32, 3)))
    return variables, random_blobs(detectron_shapes(50, width=16), seed=2)


def test_missing_misshaped_and_unknown_blobs_are_named():
    variables, blobs = _small_model_and_blobs()
    broken = dict(blobs)
    del broken["res3_1_branch2b_bn_s"], broken["res5_2_branch2c_w"]
    broken["res4_0_branch1_w"] = np.zeros((256, 128, 3, 3), np.float32)
    broken["res2_0_branch2d_w"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError) as error:
        convert_caffe2(broken, variables, "frozen_bn")
    message = str(error.value)
    for part in ("missing res3_1_branch2b_bn_s", "missing res5_2_branch2c_w",
                 "res4_0_branch1_w: shape (3, 3, 128, 256)", "unexpected res2_0_branch2d_w"):
        assert part in message
    with pytest.raises(ValueError, match="not for norm='gn'"):
        convert_caffe2(blobs, variables, "gn")


def test_foreign_and_malicious_pickles_are_refused(tmp_path):
    torchvision_names = tmp_path / "torchvision.pkl"
    torchvision_names.write_bytes(pickle.dumps({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}))
    with pytest.raises(ValueError, match=r"torchvision\.pkl.*not a Detectron Caffe2"):
        load_blobs(str(torchvision_names))

    marker = tmp_path / "marker"

    class RunsCode:
        def __reduce__(self):
            return marker.mkdir, ()

    malicious = tmp_path / "R-50.pkl"
    malicious.write_bytes(pickle.dumps({"blobs": {"conv1_w": RunsCode()}}, protocol=2))
    variables, _ = _small_model_and_blobs()
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"R-50\.pkl.*refusing to load global"):
        load_pretrained_backbone({name: {"backbone": tree} for name, tree in variables.items()}, str(malicious),
                                 "frozen_bn")
    assert not marker.exists()
    pickle.loads(malicious.read_bytes())
    assert marker.is_dir()  # the standard reader would have run it


def test_a_caffe2_pickle_needs_the_official_input(tmp_path):
    from atss_jax import train_step
    from configs import atss_r50_fpn_1x_coco

    weights = tmp_path / "R-50.pkl"
    weights.write_bytes(b"")  # check_config reads the name, not the weights
    config = atss_r50_fpn_1x_coco.get_config()  # the mmdetection recipe: RGB, torchvision's statistics
    config.model.backbone.pretrained = str(weights)
    with pytest.raises(ValueError, match="input_channels='rgb'"):
        train_step.check_config(config, 80)
    official = atss_r50_fpn_1x_coco.get_config("official")
    official.model.backbone.pretrained = str(weights)
    train_step.check_config(official, 80)
