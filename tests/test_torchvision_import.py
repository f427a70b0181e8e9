"""Converted torchvision ResNet weights give the same C3-C5 as torch (reference ResNet defined here)."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from atss_jax.models.detector import build_backbone  # noqa: E402
from atss_jax.models.torchvision_import import convert_resnet, load_state_dict  # noqa: E402
from configs import base  # noqa: E402


class TorchBlock(nn.Module):
    """torchvision's BasicBlock (expansion 1) or Bottleneck (expansion 4, stride on the 3x3, ResNeXt's grouped
    3x3 of ``int(planes * width_per_group / 64) * groups`` channels)."""

    def __init__(self, in_channels, planes, stride, bottleneck, groups=1, width_per_group=64):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups if bottleneck else planes
        out = planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
            self.convs = [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
        else:
            self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
            self.convs = [(self.conv1, self.bn1), (self.conv2, self.bn2)]
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = x
        for i, (conv, bn) in enumerate(self.convs):
            y = bn(conv(y))
            if i < len(self.convs) - 1:
                y = torch.relu(y)
        return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchResNet(nn.Module):
    def __init__(self, stages, bottleneck, groups=1, width_per_group=64):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        for s, blocks in enumerate(stages):
            layers = []
            for i in range(blocks):
                layers.append(TorchBlock(channels, 64 * 2**s, 2 if s > 0 and i == 0 else 1, bottleneck, groups,
                                         width_per_group))
                channels = 64 * 2**s * (4 if bottleneck else 1)
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(channels, 1000)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        outputs = []
        for s in range(4):
            x = getattr(self, f"layer{s + 1}")(x)
            outputs.append(x)
        return outputs[1:]


def _torch_model(depth, groups=1, width_per_group=64):
    stages = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    torch.manual_seed(depth)
    model = TorchResNet(stages, bottleneck=depth >= 50, groups=groups, width_per_group=width_per_group)
    with torch.no_grad():  # non-trivial BN statistics and affine, as a trained network has
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _backbone(**fields):
    """A float32 backbone of the base config (frozen BN, width 64, two frozen stages) with ``fields`` changed."""
    backbone_config = base.get_config().model.backbone
    backbone_config.update(fields)
    return build_backbone(backbone_config, jnp.float32)


def _variables(model, image):
    variables = model.init(jax.random.key(0), image)
    return {name: tree for name, tree in variables.items()}


@pytest.mark.parametrize("depth,groups,width_per_group", [(18, 1, 64), (50, 1, 64), (50, 32, 4)])
def test_converted_backbone_matches_torch(depth, groups, width_per_group, tmp_path):
    """ResNet-18, ResNet-50 and ResNeXt-50 32x4d (the same grouped bottleneck as ResNeXt-101's)."""
    torch_model = _torch_model(depth, groups, width_per_group)
    image = np.random.default_rng(depth).normal(size=(2, 3, 96, 128)).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy().transpose(0, 2, 3, 1) for t in torch_model(torch.from_numpy(image))]

    path = tmp_path / "resnet.npz"
    np.savez(path, **{k: v.numpy() for k, v in torch_model.state_dict().items()})
    model = _backbone(depth=depth, norm="frozen_bn", groups=groups, width_per_group=width_per_group)
    nhwc = jnp.asarray(image.transpose(0, 2, 3, 1))
    variables = convert_resnet(load_state_dict(str(path)), _variables(model, nhwc), "frozen_bn")
    outputs = model.apply(variables, nhwc)
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape
        relative = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
        assert relative < 1e-4


def test_plain_weights_load_into_deformable_stages(tmp_path):
    """DCNv2 stages take the plain network's 3x3 kernels and keep their offset predictors as initialised; with
    those predictors zeroed the converted backbone computes the torch network with the 3x3 outputs halved
    (sigmoid(0) masks)."""
    torch_model = _torch_model(50, 32, 4)
    with torch.no_grad():
        for stage in (2, 3, 4):
            for block in getattr(torch_model, f"layer{stage}"):
                block.conv2.weight.mul_(0.5)
    image = np.random.default_rng(4).normal(size=(1, 3, 64, 96)).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy().transpose(0, 2, 3, 1) for t in torch_model(torch.from_numpy(image))]
    state = {k: v.numpy() * (2.0 if k.endswith("conv2.weight") and not k.startswith("layer1") else 1.0)
             for k, v in torch_model.state_dict().items()}
    model = _backbone(depth=50, norm="frozen_bn", groups=32, width_per_group=4, deformable_stages=(2, 3, 4))
    nhwc = jnp.asarray(image.transpose(0, 2, 3, 1))
    initial = _variables(model, nhwc)
    variables = convert_resnet(state, initial, "frozen_bn")
    offset_kernel = variables["params"]["layer3_0"]["conv2"]["conv_offset"]["kernel"]
    assert offset_kernel.shape == (3, 3, 512, 27)
    np.testing.assert_array_equal(offset_kernel, initial["params"]["layer3_0"]["conv2"]["conv_offset"]["kernel"])
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: np.zeros_like(leaf) if any(getattr(k, "key", None) == "conv_offset" for k in path) else leaf,
        variables)
    for got, want in zip(model.apply(variables, nhwc), expected):
        relative = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
        assert relative < 1e-4


@pytest.mark.parametrize("groups,width_per_group,torchvision_count", [(32, 8, 88_791_336), (64, 4, 83_455_272)])
def test_resnext101_has_torchvisions_parameter_count(groups, width_per_group, torchvision_count):
    """torchvision's published sizes of resnext101_32x8d and _64x4d, less the 1000-way classifier."""
    model = _backbone(depth=101, groups=groups, width_per_group=width_per_group)
    variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    leaves = jax.tree_util.tree_leaves_with_path(variables["frozen"])
    bn_affine = sum(int(np.prod(leaf.shape)) for path, leaf in leaves if path[-1].key in ("scale", "bias"))
    convolutions = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
    classifier = 2048 * 1000 + 1000
    assert convolutions + bn_affine + classifier == torchvision_count


def test_pth_file_and_trainable_bn(tmp_path):
    torch_model = _torch_model(18)
    path = tmp_path / "resnet18.pth"
    torch.save(torch_model.state_dict(), path)
    model = _backbone(depth=18, norm="bn")
    image = jnp.zeros((1, 64, 64, 3))
    variables = convert_resnet(load_state_dict(str(path)), _variables(model, image), "bn")
    np.testing.assert_allclose(variables["batch_stats"]["bn1"]["var"], torch_model.bn1.running_var.numpy())
    np.testing.assert_allclose(variables["params"]["bn1"]["scale"], torch_model.bn1.weight.detach().numpy())


def test_wrong_depth_and_corrupt_files_are_named(tmp_path):
    state = {k: v.numpy() for k, v in _torch_model(18).state_dict().items()}
    model = _backbone(depth=50, norm="frozen_bn")
    with pytest.raises(ValueError, match=r"missing|unexpected|shape"):
        convert_resnet(state, _variables(model, jnp.zeros((1, 64, 64, 3))), "frozen_bn")
    corrupt = tmp_path / "broken.npz"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"broken\.npz"):
        load_state_dict(str(corrupt))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_state_dict(str(tmp_path / "nowhere.npz"))


def test_detector_init_loads_the_configured_backbone(tmp_path):
    from atss_jax.models.detector import build_detector, init_detector
    from configs import demo

    torch_model = _torch_model(18)
    path = tmp_path / "resnet18.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    config = demo.get_config("tiny")
    config.model.backbone.width = 64
    config.model.backbone.norm = "frozen_bn"
    config.model.backbone.pretrained = str(path)
    model = build_detector(config.model, anchors_per_location=1)
    variables = init_detector(model, config.model, jax.random.key(0), (64, 64))
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["conv1"]["kernel"],
        torch_model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(variables["frozen"]["backbone"]["bn1"]["mean"], torch_model.bn1.running_mean.numpy())
    assert "fpn" in variables["params"] and "head" in variables["params"]


def test_files_that_would_run_code_are_refused(tmp_path):
    """.pth files load with weights_only=True and .npz files without pickles: neither runs the file's code."""
    marker = tmp_path / "marker"

    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    pth = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": RunsCode()}, pth)
    with pytest.raises(ValueError, match=rf"evil\.pth' was refused and nothing from it was run: .*"
                                         rf"{os.mkdir.__module__}\.mkdir") as error:
        load_state_dict(str(pth))
    assert "weights_only" not in str(error.value) and error.value.__cause__ is None  # no advice, no torch chain
    npz = tmp_path / "evil.npz"
    np.savez(npz, conv1=np.array([RunsCode()], dtype=object))
    with pytest.raises(ValueError, match=r"evil\.npz.*allow_pickle=False"):
        load_state_dict(str(npz))
    assert not marker.exists()
    torch.load(pth, weights_only=False)  # the payload is real: a trusting reader runs it
    assert marker.is_dir()


def test_conversion_makes_the_output_folder(tmp_path):
    from scripts import convert_torchvision

    state = {"conv1.weight": torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3)}
    torch.save(state, tmp_path / "r.pth")
    out = tmp_path / "weights" / "fresh" / "r.npz"
    convert_torchvision.main(["convert_torchvision", str(tmp_path / "r.pth"), str(out)])
    np.testing.assert_array_equal(load_state_dict(out)["conv1.weight"], state["conv1.weight"].numpy())
