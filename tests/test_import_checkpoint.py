"""scripts/import_checkpoint.py end to end: an mmdetection checkpoint (mmdetection's own ATSS, shrunk) imported
into a workdir that `atss_jax.main --mode=eval` evaluates; a checkpoint that would run code is refused."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mmengine")  # the test requirements (mmdetection itself only through scripts/mmdet_peer.py)

from atss_jax import checkpoint, workdirs  # noqa: E402
from atss_jax.models import mmdet_import  # noqa: E402
from scripts import import_checkpoint, mmdet_peer  # noqa: E402
from tests.support import hangs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny demo config (ResNet-18 of width 16, 32-channel FPN and two-conv head, the 4 synthetic classes) with
# mmdetection's switches and a BN backbone, as a config file for the command line.
CONFIG_FILE = '''
from atss_jax.models import mmdet_import
from configs import demo


def get_config():
    config = mmdet_import.config_for_mmdet(demo.get_config("tiny"))
    config.model.backbone.norm = "frozen_bn"
    config.data.data_dir = {data_dir!r}
    return config
'''


def tiny_mmdet_model():
    """mmdetection's ATSS at the tiny config's size: its ResNet-18 (base_channels 16), FPN and ATSSHead."""
    model_config = copy.deepcopy(mmdet_peer.atss_r50_config(num_classes=4))
    model_config["backbone"].update(depth=18, base_channels=16)
    model_config["neck"].update(in_channels=[16, 32, 64, 128], out_channels=32)
    model_config["bbox_head"].update(in_channels=32, feat_channels=32, stacked_convs=2)
    return mmdet_peer.build_model(model_config).eval()


def test_coco_category_names_are_mmdetections():
    mmdet_peer.import_mmdet()
    from mmdet.datasets import CocoDataset

    assert import_checkpoint.COCO_CATEGORY_NAMES == tuple(CocoDataset.METAINFO["classes"])


@pytest.mark.e2e
def test_import_then_evaluate(synthetic_data_config, tmp_path):
    torch.manual_seed(0)
    state_dict = tiny_mmdet_model().state_dict()
    source = tmp_path / "atss_tiny.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": ["a", "b", "c", "d"]}, "state_dict": state_dict}, source)
    config_file = tmp_path / "tiny_mmdet.py"
    config_file.write_text(CONFIG_FILE.format(data_dir=synthetic_data_config.data_dir))
    workdir = tmp_path / "workdir"
    env = {**os.environ, "PYTHONPATH": ROOT}
    imported = subprocess.run([sys.executable, "-m", "scripts.import_checkpoint", str(source), str(workdir),
                               "--format=mmdet", f"--config={config_file}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=hangs.SUBPROCESS_S)
    assert imported.returncode == 0, imported.stderr[-3000:]
    config = workdirs.read_config(workdir)
    assert config.anchors.center_offset == 0.0 and config.eval.score_rule == "mmdetection"
    # The checkpoint holds exactly the converted weights.
    expected = mmdet_import.convert_state_dict({k: v.numpy() for k, v in state_dict.items()}, config)
    from atss_jax.init_from import source_variables

    restored = source_variables(str(workdir))
    for collection in expected:
        for name, value in _leaves(expected[collection]):
            np.testing.assert_array_equal(_get(restored[collection], name), value, err_msg="/".join(name))
    evaluated = subprocess.run([sys.executable, "-m", "atss_jax.main", "--mode=eval", f"--workdir={workdir}"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=hangs.SUBPROCESS_S)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (workdir / "metrics.json").exists()
    assert (checkpoint.checkpoint_dir(workdir) / "0").exists()


# Two iterations of mmdetection 3.3's own training loop (mmengine's Runner, its CheckpointHook) on the tiny
# model: the checkpoint it writes holds, beside the state_dict, the optimizer state, the config text and the
# message hub's HistoryBuffers and numpy values.
RUNNER_SCRIPT = """
import sys

import torch
from mmengine.dataset import pseudo_collate
from mmengine.runner import Runner
from mmengine.structures import InstanceData

from scripts import mmdet_peer
from tests.test_import_checkpoint import tiny_mmdet_model

mmdet_peer.import_mmdet()
from mmdet.structures import DetDataSample

torch.manual_seed(0)


def sample(index):
    data_sample = DetDataSample(metainfo=dict(img_shape=(64, 96), ori_shape=(64, 96), pad_shape=(64, 96),
                                              scale_factor=(1.0, 1.0), img_id=index))
    data_sample.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 12.0, 40.0, 50.0], [50.0, 5.0, 90.0, 30.0]]),
                                            labels=torch.tensor([1, 3]))
    return dict(inputs=torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), data_samples=data_sample)


loader = torch.utils.data.DataLoader([sample(i) for i in range(4)], batch_size=2, collate_fn=pseudo_collate)
runner = Runner(model=tiny_mmdet_model().train(), work_dir=sys.argv[1], train_dataloader=loader,
                train_cfg=dict(by_epoch=False, max_iters=2), default_scope="mmdet",
                optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.001, momentum=0.9, weight_decay=1e-4)),
                default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False)))
runner.train()
"""

# Reads a checkpoint the way the importer does, in a fresh interpreter: prints whether mmengine got imported
# (it must not: its classes are never looked up) and the type of a message-hub value.
LOAD_SCRIPT = """
import sys

from atss_jax.models.torchvision_import import torch_load_weights

checkpoint = torch_load_weights(sys.argv[1], sys.argv[1])
history = next(iter(checkpoint["message_hub"]["log_scalars"].values()))
print("mmengine" in sys.modules, type(history).__name__, len(checkpoint["state_dict"]))
"""


@pytest.mark.e2e
def test_a_checkpoint_of_mmdetection_3s_training_loop_imports_its_weights_alone(synthetic_data_config, tmp_path):
    trained = subprocess.run([sys.executable, "-c", RUNNER_SCRIPT, str(tmp_path / "mmdet_run")], cwd=ROOT,
                             capture_output=True, text=True, timeout=hangs.SUBPROCESS_S)
    assert trained.returncode == 0, trained.stderr[-3000:]
    source = tmp_path / "mmdet_run" / "iter_2.pth"
    written = torch.load(source, weights_only=False)  # this test's own file: trusted here, to read the truth
    assert {"meta", "state_dict", "message_hub", "optimizer"} <= set(written)
    loaded = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(source)], cwd=ROOT, capture_output=True,
                            text=True, timeout=hangs.SUBPROCESS_S)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == ["False", "InertObject", str(len(written["state_dict"]))]
    config_file = tmp_path / "tiny_mmdet.py"
    config_file.write_text(CONFIG_FILE.format(data_dir=synthetic_data_config.data_dir))
    workdir = tmp_path / "workdir"
    imported = subprocess.run([sys.executable, "-m", "scripts.import_checkpoint", str(source), str(workdir),
                               "--format=mmdet", f"--config={config_file}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=hangs.SUBPROCESS_S)
    assert imported.returncode == 0, imported.stderr[-3000:]
    # The workdir holds the weights mmdetection's loop trained, exactly.
    config = workdirs.read_config(workdir)
    expected = mmdet_import.convert_state_dict({k: v.numpy() for k, v in written["state_dict"].items()}, config)
    from atss_jax.init_from import source_variables

    restored = source_variables(str(workdir))
    for collection in expected:
        for name, value in _leaves(expected[collection]):
            np.testing.assert_array_equal(_get(restored[collection], name), value, err_msg="/".join(name))


@pytest.mark.e2e
def test_refuses_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    source = tmp_path / "evil.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "meta": Payload()}, source)
    # Through the command line, as a user meets it: one line, no traceback, no advice to load it unsafely.
    result = subprocess.run([sys.executable, "-m", "scripts.import_checkpoint", str(source),
                             str(tmp_path / "workdir"), "--format=mmdet", "--config=configs/demo.py:tiny"],
                            cwd=ROOT, capture_output=True, text=True, timeout=hangs.SUBPROCESS_S)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("import_checkpoint: ") and "evil.pth' was refused and nothing from it was run" in last
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    assert not marker.exists() and not (tmp_path / "workdir").exists()


def _leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree
