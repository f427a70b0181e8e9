"""Each official ATSS model has a config whose ":official" variant carries the official settings.

Expected values are read by hand from the official repository (github.com/sfzhang15/ATSS):
configs/atss/*.yaml, one per model, and the defaults they do not override, atss_core/config/defaults.py.
"""

import importlib

import pytest

# atss_core/config/defaults.py, not overridden by any configs/atss/*.yaml (unless the table below says so).
DEFAULTS = {
    "SOLVER.BIAS_LR_FACTOR": 2,
    "SOLVER.WEIGHT_DECAY_BIAS": 0,
    "SOLVER.MOMENTUM": 0.9,
    "SOLVER.GAMMA": 0.1,
    "SOLVER.WARMUP_FACTOR": 1.0 / 3,
    "SOLVER.WARMUP_ITERS": 500,
    "INPUT.PIXEL_MEAN": (102.9801, 115.9465, 122.7717),
    "INPUT.PIXEL_STD": (1.0, 1.0, 1.0),
    "INPUT.TO_BGR255": True,
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.BACKBONE.FREEZE_CONV_BODY_AT": 2,
    "MODEL.ATSS.ANCHOR_STRIDES": (8, 16, 32, 64, 128),
    "MODEL.ATSS.NUM_CONVS": 4,
    "MODEL.ATSS.PRIOR_PROB": 0.01,
    "MODEL.ATSS.REG_LOSS_WEIGHT": 2.0,
    "MODEL.ATSS.LOSS_ALPHA": 0.25,
    "MODEL.ATSS.LOSS_GAMMA": 2.0,
    "MODEL.ATSS.INFERENCE_TH": 0.05,
    "MODEL.ATSS.PRE_NMS_TOP_N": 1000,
    "MODEL.ATSS.NMS_TH": 0.6,
}

# Set identically in every configs/atss/*.yaml.
COMMON = {
    "MODEL.ATSS.ANCHOR_SIZES": (64, 128, 256, 512, 1024),
    "MODEL.ATSS.ASPECT_RATIOS": (1.0,),
    "MODEL.ATSS.SCALES_PER_OCTAVE": 1,
    "MODEL.ATSS.POSITIVE_TYPE": "ATSS",
    "MODEL.ATSS.TOPK": 9,
    "MODEL.ATSS.REGRESSION_TYPE": "BOX",
    "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "DATALOADER.SIZE_DIVISIBILITY": 32,
    "SOLVER.BASE_LR": 0.01,
    "SOLVER.WEIGHT_DECAY": 0.0001,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.WARMUP_METHOD": "constant",
}

_1X = {"INPUT.MIN_SIZE_TRAIN": (800,), "SOLVER.STEPS": (60000, 80000), "SOLVER.MAX_ITER": 90000}
_2X = {"INPUT.MIN_SIZE_RANGE_TRAIN": (640, 800), "SOLVER.STEPS": (120000, 160000), "SOLVER.MAX_ITER": 180000}
_MSRA_R50 = {"MODEL.WEIGHT": "catalog://ImageNetPretrained/MSRA/R-50", "MODEL.BACKBONE.CONV_BODY": "R-50-FPN-RETINANET"}
_MSRA_R101 = {"MODEL.WEIGHT": "catalog://ImageNetPretrained/MSRA/R-101",
              "MODEL.BACKBONE.CONV_BODY": "R-101-FPN-RETINANET"}


def _fair_x101(groups, width):
    return {"MODEL.WEIGHT": f"catalog://ImageNetPretrained/FAIR/20171220/X-101-{groups}x{width}d",
            "MODEL.BACKBONE.CONV_BODY": "R-101-FPN-RETINANET", "MODEL.RESNETS.STRIDE_IN_1X1": False,
            "MODEL.RESNETS.NUM_GROUPS": groups, "MODEL.RESNETS.WIDTH_PER_GROUP": width}


_NO_DCN = {"MODEL.ATSS.USE_DCN_IN_TOWER": False}


def _dcn(stages):
    return {"MODEL.RESNETS.STAGE_WITH_DCN": stages, "MODEL.RESNETS.WITH_MODULATED_DCN": True,
            "MODEL.RESNETS.DEFORMABLE_GROUPS": 1, "MODEL.ATSS.USE_DCN_IN_TOWER": True}


# Every file of the official configs/atss/ -> (our config, the file's own settings).
OFFICIAL = {
    "atss_R_50_FPN_1x.yaml": ("atss_r50_fpn_1x_coco", {**_MSRA_R50, **_NO_DCN, **_1X}),
    "atss_R_101_FPN_1x.yaml": ("atss_r101_fpn_1x_coco", {**_MSRA_R101, **_NO_DCN, **_1X}),
    "atss_R_101_FPN_2x.yaml": ("atss_r101_fpn_ms_2x_coco", {**_MSRA_R101, **_NO_DCN, **_2X}),
    "atss_dcnv2_R_50_FPN_1x.yaml": ("atss_r50_dcnv2_fpn_1x_coco",
                                    {**_MSRA_R50, **_dcn((False, True, True, True)), **_1X}),
    "atss_dcnv2_R_101_FPN_1x.yaml": ("atss_r101_dcnv2_fpn_1x_coco",
                                     {**_MSRA_R101, **_dcn((False, True, True, True)), **_1X}),
    "atss_dcnv2_R_101_FPN_2x.yaml": ("atss_r101_dcnv2_fpn_ms_2x_coco",
                                     {**_MSRA_R101, **_dcn((False, True, True, True)), **_2X}),
    "atss_X_101_32x8d_FPN_2x.yaml": ("atss_x101_32x8d_fpn_ms_2x_coco", {**_fair_x101(32, 8), **_NO_DCN, **_2X}),
    "atss_X_101_64x4d_FPN_2x.yaml": ("atss_x101_64x4d_fpn_ms_2x_coco", {**_fair_x101(64, 4), **_NO_DCN, **_2X}),
    "atss_dcnv2_X_101_32x8d_FPN_2x.yaml": ("atss_x101_32x8d_dcnv2_fpn_ms_2x_coco",
                                           {**_fair_x101(32, 8), **_dcn((False, False, True, True)), **_2X}),
    "atss_dcnv2_X_101_64x4d_FPN_2x.yaml": ("atss_x101_64x4d_dcnv2_fpn_ms_2x_coco",
                                           {**_fair_x101(64, 4), **_dcn((False, False, True, True)), **_2X}),
}


def _min_sizes(official):
    """atss_core/data/transforms/build.py: MIN_SIZE_RANGE_TRAIN (a, b) means every integer a..b, one drawn
    uniformly per image (Resize's random.choice); otherwise MIN_SIZE_TRAIN."""
    if "INPUT.MIN_SIZE_RANGE_TRAIN" in official:
        low, high = official["INPUT.MIN_SIZE_RANGE_TRAIN"]
        return tuple(range(low, high + 1))
    return official["INPUT.MIN_SIZE_TRAIN"]


@pytest.mark.parametrize("yaml_name", sorted(OFFICIAL))
def test_official_variant_has_the_official_settings(yaml_name):
    name, own = OFFICIAL[yaml_name]
    official = {**DEFAULTS, **COMMON, **own}
    config = importlib.import_module(f"configs.{name}").get_config("official")
    assert config.recipe == "official"

    backbone, head = config.model.backbone, config.model.head
    assert backbone.depth == int(official["MODEL.BACKBONE.CONV_BODY"].split("-")[1])
    assert backbone.groups == official.get("MODEL.RESNETS.NUM_GROUPS", 1)
    assert backbone.width_per_group == official.get("MODEL.RESNETS.WIDTH_PER_GROUP", 64)
    assert backbone.stride_in_1x1 == official["MODEL.RESNETS.STRIDE_IN_1X1"]
    assert backbone.norm == "frozen_bn"
    assert backbone.frozen_stages == official["MODEL.BACKBONE.FREEZE_CONV_BODY_AT"]
    stages = official.get("MODEL.RESNETS.STAGE_WITH_DCN", (False,) * 4)
    assert tuple(backbone.deformable_stages) == tuple(i + 1 for i, on in enumerate(stages) if on)
    assert head.deformable_tower == official["MODEL.ATSS.USE_DCN_IN_TOWER"]
    assert head.num_convs == official["MODEL.ATSS.NUM_CONVS"]
    assert head.prior_prob == official["MODEL.ATSS.PRIOR_PROB"]
    assert head.regression == official["MODEL.ATSS.REGRESSION_TYPE"].lower()
    assert config.model.fpn_features == 256

    assert config.model.input_channels == ("bgr" if official["INPUT.TO_BGR255"] else "rgb")
    assert tuple(config.model.pixel_mean) == official["INPUT.PIXEL_MEAN"]
    assert tuple(config.model.pixel_std) == official["INPUT.PIXEL_STD"]

    anchors = config.anchors
    assert tuple(anchors.strides) == official["MODEL.ATSS.ANCHOR_STRIDES"]
    assert tuple(anchors.octave_base_scale * s for s in anchors.strides) == official["MODEL.ATSS.ANCHOR_SIZES"]
    assert tuple(anchors.aspect_ratios) == official["MODEL.ATSS.ASPECT_RATIOS"]
    assert len(anchors.scales) == official["MODEL.ATSS.SCALES_PER_OCTAVE"]
    assert config.assigner.name == official["MODEL.ATSS.POSITIVE_TYPE"].lower()
    assert config.assigner.topk == official["MODEL.ATSS.TOPK"]
    assert config.loss.box_loss_weight == official["MODEL.ATSS.REG_LOSS_WEIGHT"]
    assert config.loss.focal_alpha == official["MODEL.ATSS.LOSS_ALPHA"]
    assert config.loss.focal_gamma == official["MODEL.ATSS.LOSS_GAMMA"]
    assert config.eval.score_threshold == official["MODEL.ATSS.INFERENCE_TH"]
    assert config.eval.pre_nms_topk == official["MODEL.ATSS.PRE_NMS_TOP_N"]
    assert config.eval.nms_iou_threshold == official["MODEL.ATSS.NMS_TH"]

    data = config.data
    assert tuple(data.min_sizes) == _min_sizes(official)
    assert data.max_size == official["INPUT.MAX_SIZE_TRAIN"]
    assert data.eval_min_size == official["INPUT.MIN_SIZE_TEST"]
    assert data.max_size == official["INPUT.MAX_SIZE_TEST"]
    assert all(side % official["DATALOADER.SIZE_DIVISIBILITY"] == 0 for side in data.canvas)
    assert data.random_flip

    optimizer, train = config.optimizer, config.train
    assert train.global_batch == optimizer.base_batch == official["SOLVER.IMS_PER_BATCH"]
    assert train.num_steps == official["SOLVER.MAX_ITER"]
    assert optimizer.base_lr == official["SOLVER.BASE_LR"]
    assert optimizer.weight_decay == official["SOLVER.WEIGHT_DECAY"]
    assert optimizer.momentum == official["SOLVER.MOMENTUM"]
    assert optimizer.lr_decay == official["SOLVER.GAMMA"]
    assert tuple(round(m * train.num_steps) for m in optimizer.lr_milestones) == official["SOLVER.STEPS"]
    assert optimizer.bias_lr_factor == official["SOLVER.BIAS_LR_FACTOR"]
    assert optimizer.weight_decay * optimizer.bias_weight_decay_factor == official["SOLVER.WEIGHT_DECAY_BIAS"]
    # Norm scales (GroupNorm weights) and the head's scales are not biases: decayed as the kernels.
    assert optimizer.decay_norm_and_bias
    assert optimizer.warmup_method == official["SOLVER.WARMUP_METHOD"]
    assert optimizer.warmup_factor == pytest.approx(official["SOLVER.WARMUP_FACTOR"])
    assert optimizer.warmup_steps == official["SOLVER.WARMUP_ITERS"]
    assert optimizer.clip_grad_norm == 0


@pytest.mark.parametrize("yaml_name", sorted(OFFICIAL))
def test_default_variant_differs_only_in_the_recipe(yaml_name):
    """The plain config is the same model and schedule; only the recipe fields differ (mmdetection's)."""
    module = importlib.import_module(f"configs.{OFFICIAL[yaml_name][0]}")
    plain, official = module.get_config().to_dict(), module.get_config("official").to_dict()
    assert plain["recipe"] == "mmdetection"
    recipe_fields = {("recipe",), ("optimizer", "bias_lr_factor"), ("optimizer", "bias_weight_decay_factor"),
                     ("optimizer", "warmup_method"), ("model", "input_channels"), ("model", "pixel_mean"),
                     ("model", "pixel_std"), ("model", "backbone", "stride_in_1x1"), ("eval", "anchor_pad_divisor")}

    def leaves(tree, prefix=()):
        for key, value in tree.items():
            yield from leaves(value, (*prefix, key)) if isinstance(value, dict) else [((*prefix, key), value)]

    differing = {path for (path, a), (_, b) in zip(leaves(plain), leaves(official)) if a != b}
    assert differing <= recipe_fields
    assert plain["optimizer"]["bias_lr_factor"] == plain["optimizer"]["bias_weight_decay_factor"] == 1
    assert plain["optimizer"]["warmup_method"] == "linear"
    assert plain["model"]["input_channels"] == "rgb" and not plain["model"]["backbone"]["stride_in_1x1"]
    assert plain["eval"]["anchor_pad_divisor"] == 1 and official["eval"]["anchor_pad_divisor"] == 32


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="'offical'"):
        importlib.import_module("configs.atss_r50_fpn_1x_coco").get_config("offical")
