"""Base config: ATSS R50-FPN 1x on COCO. Experiments override a few fields of it."""

import math

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    # A TFDS name ("coco/2017"), "coco_format" (config.data.coco_format) or "synthetic_shapes" (the demo).
    config.data.name = "coco/2017"
    config.data.data_dir = ""  # TFDS data directory; "" = TFDS's default (~/tensorflow_datasets)
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    # Fixed (height, width) canvas, multiples of 32: images are resized into it and zero-padded.
    config.data.canvas = (800, 1344)
    # Portrait images go to the transposed canvas (1344 x 800), so every image gets the official short side
    # (min_sizes, eval_min_size) and long-side cap (max_size) whatever its orientation; each global batch
    # draws from one orientation (two compiles). Off, portrait images are shrunk to fit the landscape canvas.
    config.data.aspect_ratio_buckets = True
    config.data.min_sizes = (800,)  # short-side targets; several = multi-scale training, one drawn per image
    config.data.max_size = 1333  # longest side after resizing
    config.data.eval_min_size = 800
    config.data.random_flip = True
    config.data.max_boxes = 100  # more valid boxes in one image is an error naming the image
    config.data.prefetch_batches = 2
    config.data.num_threads = 0  # tf.data private thread pool; 0 = TF's default
    config.data.coco_format = ml_collections.ConfigDict()
    config.data.coco_format.name = ""
    config.data.coco_format.annotations = ml_collections.ConfigDict({"train": "", "validation": ""})
    config.data.coco_format.images = ml_collections.ConfigDict({"train": "", "validation": ""})
    config.data.synthetic = ml_collections.ConfigDict()
    config.data.synthetic.num_train = 2000
    config.data.synthetic.num_validation = 200
    config.data.synthetic.seed = 0
    config.data.synthetic.min_image_side = 128
    config.data.synthetic.max_image_side = 224
    config.data.synthetic.max_objects = 6

    config.model = ml_collections.ConfigDict()
    config.model.num_classes = 80
    # Computation dtype ("float32" or "bfloat16"); parameters stay float32.
    config.model.dtype = "float32"
    # Input normalisation on device, after the uint8 image leaves the host: channel order fed to the backbone
    # ("rgb", torchvision/mmdetection weights; "bgr", Detectron's Caffe2 weights), then (x - mean) / std per channel,
    # both given in that order on the 0-255 scale. The canvas padding is zero after normalisation.
    config.model.input_channels = "rgb"
    config.model.pixel_mean = (123.675, 116.28, 103.53)
    config.model.pixel_std = (58.395, 57.12, 57.375)
    config.model.backbone = ml_collections.ConfigDict()
    config.model.backbone.depth = 50
    # "frozen_bn" (ImageNet-pretrained, the COCO default), "bn" (trainable) or "gn" (from scratch).
    config.model.backbone.norm = "frozen_bn"
    config.model.backbone.frozen_stages = 2  # stem and first stage
    config.model.backbone.width = 64
    # ResNeXt: cardinality and bottleneck width per group (1 and 64 = ResNet; 32 and 8 = X-101-32x8d).
    config.model.backbone.groups = 1
    config.model.backbone.width_per_group = 64
    # Stages (1-4 = torchvision's layer1-4 = C2-C5) whose 3x3 convs are DCNv2; the official dcnv2 configs
    # (STAGE_WITH_DCN): (2, 3, 4) = C3-C5 for, (3, 4) = C4-C5 for X-101 (`with_dcnv2`).
    config.model.backbone.deformable_stages = ()
    # ImageNet weights, the format from the file name: a torchvision ResNet state_dict (.npz from
    # scripts/convert_torchvision.py, or .pth) or a Detectron Caffe2 pickle as downloaded (.pkl: R-50.pkl, R-101.pkl,
    # X-101-32x8d.pkl, X-101-64x4d.pkl; BGR input and Detectron's means, see `with_official_recipe`); "" = none.
    config.model.backbone.pretrained = ""
    # Where a bottleneck's stride sits: False = the 3x3 conv (torchvision, FAIR X-101), True = the first 1x1
    # conv (Detectron's MSRA weights, which the official ATSS models start from).
    config.model.backbone.stride_in_1x1 = False
    config.model.fpn_features = 256
    # P7 from ReLU(P6) (the official LastLevelP6P7); False: from P6 itself (mmdetection's FPN with
    # add_extra_convs='on_output', relu_before_extra_convs=False).
    config.model.fpn_relu_before_p7 = True
    config.model.head = ml_collections.ConfigDict()
    config.model.head.features = 256
    config.model.head.num_convs = 4
    # "box": deltas from anchors (anchor-based); "point": LTRB distances in strides (FCOS-style; one anchor per
    # location, box bias starting at 4 as the official REGRESSION_TYPE 'POINT').
    config.model.head.regression = "box"
    # The paper's Table 1 switches.
    config.model.head.use_group_norm = True
    config.model.head.use_centerness = True
    config.model.head.use_scales = True
    config.model.head.deformable_tower = False  # last conv of each tower is DCNv2 (the paper's DCN rows)
    config.model.head.prior_prob = 0.01  # initial foreground probability of the classifier (focal loss's prior)
    # Decoding of "box" deltas (boxes.BOX_CODERS): "official" clamps the log-size deltas from above at
    # log(1000/16); "mmdetection" (DeltaXYWHBBoxCoder) clamps them on both sides.
    config.model.head.box_coder = "official"

    # atss_jax.losses.detection_losses.
    config.loss = ml_collections.ConfigDict()
    config.loss.box_loss = "giou"  # Table 1 "GIoU Loss"; "smooth_l1" regresses deltas instead
    config.loss.box_loss_weight = 2.0  # multiplier of the box term (ATSS: 2 with GIoU)
    config.loss.focal_alpha = 0.25  # focal loss weight of positives
    config.loss.focal_gamma = 2.0  # focal loss focusing exponent
    config.loss.smooth_l1_beta = 1.0 / 9.0  # where smooth-L1 turns from quadratic to linear (box_loss="smooth_l1")
    # One of losses.CLASSIFICATION_LOSSES: "focal" (hard targets), "quality_focal" (GFL's QFL) or "varifocal"
    # (VarifocalNet's VFL), the last two with a quality target at positives: the prediction-aware assigner's soft
    # target, else the IoU of the predicted box with its box. model.head.use_centerness may be off with them.
    config.loss.classification = "focal"
    config.loss.quality_beta = 2.0  # QFL's |y - p|^beta
    config.loss.varifocal_alpha = 0.75  # VFL's weight of negatives
    config.loss.varifocal_gamma = 2.0  # VFL's p^gamma on negatives

    config.anchors = ml_collections.ConfigDict()
    config.anchors.strides = (8, 16, 32, 64, 128)
    config.anchors.octave_base_scale = 8.0
    config.anchors.scales = (1.0,)
    config.anchors.aspect_ratios = (1.0,)
    # Anchor centres at ((x + center_offset) * stride, (y + center_offset) * stride): 0.5 as the official code
    # (its inclusive-pixel anchors), 0 as mmdetection's AnchorGenerator.
    config.anchors.center_offset = 0.5

    config.assigner = ml_collections.ConfigDict()
    # One of atss_jax.assigners.ASSIGNERS.
    config.assigner.name = "atss"
    config.assigner.topk = 9
    # ATSS only: "grid" (a star of locations per box and level, the fast default) or "full_matrix" (reference);
    # both give the same assignment.
    config.assigner.atss_implementation = "grid"
    # ATSS and max_iou's in_gt_box: an anchor centre must lie this far (pixels) inside its box.
    config.assigner.center_eps = 0.01
    # max_iou (RetinaNet).
    config.assigner.pos_iou_thr = 0.5
    config.assigner.neg_iou_thr = 0.4
    config.assigner.low_quality_matches = True
    # Table 1 "In GT Box": positives whose anchor centre is outside their box are ignored. Always on in the official
    # code's POSITIVE_TYPE 'IoU'; False = the original RetinaNet.
    config.assigner.in_gt_box = True
    # fcos and fcos_center_sampling.
    config.assigner.regress_ranges = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, math.inf))
    config.assigner.center_sampling_radius = 1.5
    # Prediction-aware assigners (atss_jax.assigners.PREDICTION_AWARE) read the gradient-stopped class scores and
    # decoded boxes. Before step warmup_assigner_steps they are replaced by ATSS (topk above), as TOOD's first
    # epochs (4 of 12 = 30k of 90k steps); 0 = from the start.
    config.assigner.warmup_assigner_steps = 0
    # tal (TOOD): alignment t = score^alpha * IoU^beta, the topk anchors of highest t per box are candidates.
    config.assigner.tal_topk = 13
    config.assigner.tal_alpha = 1.0
    config.assigner.tal_beta = 6.0
    # simota (YOLOX): cost = cls_weight * BCE + iou_weight * -log IoU (+1e5 outside the box and its centre region
    # of center_radius strides); each box takes floor(sum of its candidate_topk largest IoUs) anchors, at least 1.
    config.assigner.simota_center_radius = 2.5
    config.assigner.simota_candidate_topk = 10
    config.assigner.simota_iou_weight = 3.0
    config.assigner.simota_cls_weight = 1.0
    # ota: optimal transport from the boxes (dynamic k units each: floor(sum of candidate_topk IoUs)) and the
    # background to the anchors; cost = focal + iou_weight * GIoU loss (+1e6 outside the centre prior of center_radius
    # strides), `iterations` log-domain Sinkhorn steps at `epsilon` (the official code's 20, 3, 0.1, 50).
    config.assigner.ota_center_radius = 2.5
    config.assigner.ota_candidate_topk = 20
    config.assigner.ota_iou_weight = 3.0
    config.assigner.ota_epsilon = 0.1
    config.assigner.ota_iterations = 50
    # paa: per box and level the paa_topk initial (IoU >= 0.1) positives of lowest focal + paa_box_weight * GIoU loss
    # are split by a two-Gaussian mixture fitted in paa_em_iterations EM steps; the low-loss component's are positive.
    config.assigner.paa_topk = 9
    config.assigner.paa_box_weight = 1.3
    config.assigner.paa_em_iterations = 30
    # ota and paa: the focal loss in their costs.
    config.assigner.cost_focal_alpha = 0.25
    config.assigner.cost_focal_gamma = 2.0

    config.seed = 0  # initialisation, data order and augmentation
    # Fine-tuning (atss_jax/init_from.py): a detector's workdir (a training's, or scripts/import_checkpoint.py's)
    # whose latest weights start this training where path and shape match ("" = none; a resumed run keeps its
    # own checkpoint). With init_from_class_map the class layer's rows of categories shared by name load too.
    config.init_from = ""
    config.init_from_class_map = False
    # Whose training recipe the config follows (say it in the config's docstring):
    #   "mmdetection": mmdetection's ATSS: torchvision ImageNet weights (RGB, torchvision's mean and std, stride
    #     in the 3x3 conv), one rate and weight decay for every parameter, linear warmup; here with the official
    #     iteration schedule and warmup factor (mmdetection warms up from 0.001 and decays at epochs 8 and 11).
    #   "official": the official code (sfzhang15/ATSS on maskrcnn-benchmark), set by `with_official_recipe`.
    config.recipe = "mmdetection"
    # COCO-size training on a CPU would take months: atss_jax.main refuses it unless --allow_cpu is given.
    config.requires_accelerator = True

    config.train = ml_collections.ConfigDict()
    config.train.global_batch = 16  # over all devices of all hosts
    config.train.num_steps = 90_000  # 1x schedule at batch 16 (about 12 COCO epochs)
    config.train.log_every = 50
    config.train.eval_every = 0  # 0: evaluate at the end only; -1: never (evaluate apart with --mode=eval)
    config.train.checkpoint_every = 2_000
    config.train.max_checkpoints_to_keep = 3
    # Divergence: training stops (and no checkpoint of the diverged steps is kept) when the mean loss of the steps
    # since the last log or checkpoint exceeds this factor x the lowest such mean of the run so far; 0: only a
    # non-finite loss stops it.
    config.train.divergence_factor = 10.0
    # A jax.profiler trace of this many steps from profile_first_step (after compilation) into
    # workdir/plugins/profile, for TensorBoard's Profile tab; 0 = no trace.
    config.train.profile_steps = 0
    config.train.profile_first_step = 10

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.base_lr = 0.01  # for base_batch images; scaled linearly with the global batch
    config.optimizer.base_batch = 16
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay_norm_and_bias = True  # False exempts every 1-D parameter (norm scales, biases)
    # Parameters named "bias" (convs, GroupNorm; optim.bias_mask) train at this multiple of the rate with this
    # multiple of weight_decay: the official solver's BIAS_LR_FACTOR 2 and WEIGHT_DECAY_BIAS 0 (factors 2 and 0).
    config.optimizer.bias_lr_factor = 1.0
    config.optimizer.bias_weight_decay_factor = 1.0
    config.optimizer.warmup_steps = 500
    # Steps 0 .. warmup_steps - 1 run at a fraction of the rate: "linear" rises from warmup_factor to 1,
    # "constant" holds warmup_factor (the official configs' WARMUP_METHOD).
    config.optimizer.warmup_method = "linear"
    config.optimizer.warmup_factor = 1.0 / 3.0
    config.optimizer.lr_milestones = (2.0 / 3.0, 8.0 / 9.0)  # fractions of num_steps (60k and 80k of 90k)
    config.optimizer.lr_decay = 0.1
    config.optimizer.clip_grad_norm = 0.0  # 0: no clipping

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_per_device = 8
    # An annotations JSON for pycocotools; "" = the eval split's original JSON, recorded when it was prepared
    # (coco_eval.ground_truth; a dataset prepared before that: built from the split, with a warning).
    config.eval.annotations_file = ""
    # "faster_coco_eval" (C++, same 12 numbers: scripts/benchmark_eval.py checks) or "pycocotools".
    config.eval.evaluator = "faster_coco_eval"
    config.eval.score_threshold = 0.05
    config.eval.pre_nms_topk = 1000
    config.eval.nms_iou_threshold = 0.6
    config.eval.max_detections = 100
    # postprocess.SCORE_RULES: "official" ranks candidates by class_prob * centerness and scores them
    # sqrt(class_prob * centerness); "mmdetection" ranks by class_prob, scores class_prob * centerness and drops
    # boxes of zero width or height (its min_bbox_size=0).
    config.eval.score_rule = "official"
    # Which anchors may detect: those whose centre lies inside the resized image rounded up to a multiple of this.
    # 1: the image alone. 32: the image padded as mmdetection and the official code pad it (size divisor 32);
    # their test-time heads keep every anchor of the padded input, so an image padded inside its batch gets
    # detections from anchors in the padding too (their import configs and the official recipe set it).
    config.eval.anchor_pad_divisor = 1
    config.eval.num_images_to_draw = 4
    config.eval.draw_score_threshold = 0.3
    # Test-time augmentation (atss_jax/tta.py), the official TEST.BBOX_AUG (defaults as its defaults.py, off).
    # Views: the plain evaluation, mirrored too with `flip` (H_FLIP), then each of `min_sizes` (SCALES) with its
    # long-side cap (`max_size`, MAX_SIZE; data.max_size below data.eval_min_size, as the official vote path),
    # each also mirrored with `scale_flip` (SCALE_H_FLIP). `size_ranges` (SCALE_RANGES): per entry of
    # `min_sizes`, the (low, high) bounds, exclusive, on sqrt(box area) in that view's pixels outside which its
    # detections are dropped; () = keep all. The views' detections (max_detections above, each) merge per image
    # by `merge`: "nms" (class-wise NMS at nms_iou_threshold above), "vote" or "soft-vote" (the official box
    # voting at IoU `vote_threshold`; soft members keep scores >= `soft_score_threshold`); the best
    # `max_detections` are kept. No detection images are drawn with TTA.
    config.eval.tta = ml_collections.ConfigDict()
    config.eval.tta.enabled = False
    config.eval.tta.flip = False
    config.eval.tta.min_sizes = ()
    config.eval.tta.max_size = 4000
    config.eval.tta.scale_flip = False
    config.eval.tta.size_ranges = ()
    config.eval.tta.merge = "nms"
    config.eval.tta.vote_threshold = 0.66
    config.eval.tta.soft_score_threshold = 0.05
    config.eval.tta.max_detections = 100

    return config.lock()


def with_dcnv2(config: ml_collections.ConfigDict, stages: tuple[int, ...] = (2, 3, 4)) -> ml_collections.ConfigDict:
    """``config`` with modulated deformable convolutions in the 3x3 convs of backbone ``stages`` (1-4 = C2-C5)
    and the last conv of each head tower. The official ``dcnv2`` configs (``STAGE_WITH_DCN``): C3-C5, the default,
    for R-50 and R-101; C4-C5, ``(3, 4)``, for X-101."""
    config.model.backbone.deformable_stages = stages
    config.model.head.deformable_tower = True
    return config


def with_prediction_aware_assigner(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """``config`` with the prediction-aware assigner ``name`` (assigners.PREDICTION_AWARE), trained as GFL/TOOD train
    theirs: Quality Focal Loss on the assigner's soft targets, no centre-ness branch; TAL starts from ATSS for the
    first third of the schedule (TOOD: 4 of 12 epochs)."""
    config.assigner.name = name
    config.loss.classification = "quality_focal"
    config.model.head.use_centerness = False
    if name == "tal":
        config.assigner.warmup_assigner_steps = config.train.num_steps // 3
    return config


# The official configs' input (atss_core/config/defaults.py INPUT.*, not overridden by configs/atss/*.yaml): BGR
# on the 0-255 scale minus Detectron's means, standard deviation 1.
OFFICIAL_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)


def with_official_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` trained as the official code trains it (``config.recipe = "official"``).

    The solver (atss_core/solver/build.py, lr_scheduler.py; SOLVER.* in defaults.py and configs/atss/*.yaml):
    biases at twice the rate without weight decay, a constant warmup at 1/3 of the rate for 500 steps. The
    backbone starts from Detectron's Caffe2 ImageNet weights (a ``.pkl`` in ``model.backbone.pretrained``):
    BGR input, Detectron's means, std 1, and the stride in the first 1x1 conv for the MSRA ResNets
    (STRIDE_IN_1X1 True, the default) but in the 3x3 conv for FAIR's ResNeXts (the X-101 yamls set it False).
    Multi-scale training (``data.min_sizes``) already draws every short side 640..800 as MIN_SIZE_RANGE_TRAIN.
    """
    config.recipe = "official"
    config.optimizer.bias_lr_factor = 2.0
    config.optimizer.bias_weight_decay_factor = 0.0
    config.optimizer.warmup_method = "constant"
    config.optimizer.warmup_factor = 1.0 / 3.0
    config.optimizer.warmup_steps = 500
    config.model.input_channels = "bgr"
    config.model.pixel_mean = OFFICIAL_PIXEL_MEAN_BGR
    config.model.pixel_std = (1.0, 1.0, 1.0)
    config.model.backbone.stride_in_1x1 = config.model.backbone.groups == 1
    config.eval.anchor_pad_divisor = 32  # its test-time head keeps the anchors of the padded input
    return config


VARIANTS = ("", "official")


def variant(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """An ATSS config's variant ``name`` (``--config=configs/atss_....py:official``): "" itself (the
    mmdetection recipe), "official" the official code's recipe (`with_official_recipe`)."""
    if name not in VARIANTS:
        raise ValueError(f"The ATSS configs have no variant {name!r}; they have {VARIANTS}.")
    return with_official_recipe(config) if name == "official" else config
