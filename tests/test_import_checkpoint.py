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
