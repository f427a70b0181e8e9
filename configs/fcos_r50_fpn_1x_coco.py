"""The paper's FCOS baseline as the official ATSS code runs it (POSITIVE_TYPE 'SSC', REGRESSION_TYPE 'POINT'):
points with FCOS's spatial (inside the box) and scale (regress ranges) constraints, no centre sampling, with
everything else as ATSS (GN, GIoU, centre-ness, scales). Paper Table 1 and Table 2 (Spatial and Scale
Constraint, Point): 37.8 AP.

The LTRB regression starts at 4 strides (box bias 4, as the official REGRESSION_TYPE 'POINT'); FCOS's own code
(and mmdetection's FCOSHead) start it at zero and take exp() (or, with norm_on_bbox, ReLU) of it. This follows
the ATSS code, which produced the paper's numbers."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model.head.regression = "point"
    config.assigner.name = "fcos"
    return config
