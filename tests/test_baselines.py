"""The paper's baseline configs (Tables 1 and 2) switch on exactly the improvements their rows list.

The reference is the paper's tables, written out here: Table 1 adds GN, GIoU, In GT Box, centre-ness
and the scalar one at a time to RetinaNet (#A = 1); Table 2 crosses the classification rule (IoU =
RetinaNet's max-IoU, SSC = FCOS's spatial and scale constraints) with the regression (box, point).
(Every config is also built at full size by tests/test_configs.py.)
"""

import importlib

import pytest

from configs import base

SUFFIX = "_r50_fpn_1x_coco"
# Table 1: config -> (#A, GN, GIoU, In GT Box, centre-ness, scalar).
TABLE_1 = {
    "retinanet_a9": (9, False, False, False, False, False),
    "retinanet_a1_baseline": (1, False, False, False, False, False),
    "retinanet_a1_gn": (1, True, False, False, False, False),
    "retinanet_a1_gn_giou": (1, True, True, False, False, False),
    "retinanet_a1_gn_giou_gtbox": (1, True, True, True, False, False),
    "retinanet_a1_gn_giou_gtbox_ctr": (1, True, True, True, True, False),
    "retinanet_a1": (1, True, True, True, True, True),
}
# Table 2: config -> (assigner, regression, AP).
TABLE_2 = {
    "retinanet_a1": ("max_iou", "box", "37.0"),
    "retinanet_a1_point": ("max_iou", "point", "36.9"),
    "fcos_box": ("fcos", "box", "37.8"),
    "fcos": ("fcos", "point", "37.8"),
}


def _config(name: str):
    module = importlib.import_module(f"configs.{name}{SUFFIX}")
    return module, module.get_config()


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_table_1_rows(name):
    _, config = _config(name)
    anchors, group_norm, giou, in_gt_box, centerness, scalar = TABLE_1[name]
    assert len(config.anchors.scales) * len(config.anchors.aspect_ratios) == anchors
    # RetinaNet's 9 anchors: 3 octave scales x 3 ratios from 4 strides; #A = 1: one 8-stride square.
    assert config.anchors.octave_base_scale == (4.0 if anchors == 9 else 8.0)
    assert config.assigner.name == "max_iou" and config.assigner.in_gt_box == in_gt_box
    assert (config.assigner.pos_iou_thr, config.assigner.neg_iou_thr) == (0.5, 0.4)
    head = config.model.head
    assert (head.use_group_norm, head.use_centerness, head.use_scales) == (group_norm, centerness, scalar)
    assert head.regression == "box"
    if giou:  # the official ATSS loss: GIoU with REG_LOSS_WEIGHT 2
        assert (config.loss.box_loss, config.loss.box_loss_weight) == ("giou", 2.0)
    else:  # maskrcnn-benchmark's RetinaNet: smooth-L1, beta 0.11, divided by 4 x positives
        assert (config.loss.box_loss, config.loss.box_loss_weight, config.loss.smooth_l1_beta) == (
            "smooth_l1", 0.25, 0.11)


def test_full_row_is_atss_with_max_iou_assignment():
    """The last Table 1 row differs from the ATSS recipe only in how positives are chosen."""
    _, retinanet = _config("retinanet_a1")
    atss = base.get_config()
    assert retinanet.assigner.name == "max_iou" and atss.assigner.name == "atss"
    with atss.unlocked():
        atss.assigner.name = "max_iou"
    assert retinanet.to_dict() == atss.to_dict()


@pytest.mark.parametrize("name", sorted(TABLE_2))
def test_table_2_cells(name):
    module, config = _config(name)
    assigner, regression, ap = TABLE_2[name]
    assert (config.assigner.name, config.model.head.regression) == (assigner, regression)
    assert f"{ap} AP" in module.__doc__
    # Everything else as ATSS: one anchor, GN, GIoU, centre-ness, scales.
    head = config.model.head
    assert (head.use_group_norm, head.use_centerness, head.use_scales, config.loss.box_loss) == (
        True, True, True, "giou")
    assert len(config.anchors.scales) * len(config.anchors.aspect_ratios) == 1
