"""Base config: ATSS R50-FPN 1x on COCO. Experiments override a few fields of it."""

import math

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    # Fixed (height, width) canvas: images are resized into it and zero-padded; one compile.
    config.data.canvas = (800, 1344)
    config.data.max_boxes = 100

    config.anchors = ml_collections.ConfigDict()
    config.anchors.strides = (8, 16, 32, 64, 128)
    config.anchors.octave_base_scale = 8.0
    config.anchors.scales = (1.0,)
    config.anchors.aspect_ratios = (1.0,)

    config.assigner = ml_collections.ConfigDict()
    # One of atss_jax.assigners.ASSIGNERS.
    config.assigner.name = "atss"
    config.assigner.topk = 9
    # ATSS only: "grid" (window of locations per box, the fast default) or "full_matrix" (reference);
    # both give the same assignment.
    config.assigner.atss_implementation = "grid"
    config.assigner.center_eps = 0.01
    # max_iou (RetinaNet).
    config.assigner.pos_iou_thr = 0.5
    config.assigner.neg_iou_thr = 0.4
    config.assigner.low_quality_matches = True
    # fcos and fcos_center_sampling.
    config.assigner.regress_ranges = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, math.inf))
    config.assigner.center_sampling_radius = 1.5

    return config.lock()
