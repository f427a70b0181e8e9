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
    # Fixed (height, width) canvas, multiples of 32: images are resized into it and zero-padded; one compile.
    config.data.canvas = (800, 1344)
    # Also use the transposed canvas for images of the other orientation (two compiles, less padding).
    config.data.aspect_ratio_buckets = False
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
    config.model.backbone = ml_collections.ConfigDict()
    config.model.backbone.depth = 50
    # "frozen_bn" (ImageNet-pretrained, the COCO default), "bn" (trainable) or "gn" (from scratch).
    config.model.backbone.norm = "frozen_bn"
    config.model.backbone.frozen_stages = 2  # stem and first stage
    config.model.backbone.width = 64
    # ResNeXt: cardinality and bottleneck width per group (1 and 64 = ResNet; 32 and 8 = X-101-32x8d).
    config.model.backbone.groups = 1
    config.model.backbone.width_per_group = 64
    # Stages (1-4 = torchvision's layer1-4) whose 3x3 convs are DCNv2; the paper's DCN rows: (2, 3, 4).
    config.model.backbone.deformable_stages = ()
    # A torchvision ResNet state_dict (.npz from scripts/convert_torchvision.py, or .pth); "" = none.
    config.model.backbone.pretrained = ""
    config.model.fpn_features = 256
    config.model.head = ml_collections.ConfigDict()
    config.model.head.features = 256
    config.model.head.num_convs = 4
    # "box": deltas from anchors (anchor-based); "point": LTRB distances in strides (FCOS-style).
    config.model.head.regression = "box"
    # The paper's Table 1 switches.
    config.model.head.use_group_norm = True
    config.model.head.use_centerness = True
    config.model.head.use_scales = True
    config.model.head.deformable_tower = False  # last conv of each tower is DCNv2 (the paper's DCN rows)
    config.model.head.prior_prob = 0.01  # initial foreground probability of the classifier (focal loss's prior)

    # atss_jax.losses.detection_losses.
    config.loss = ml_collections.ConfigDict()
    config.loss.box_loss = "giou"  # Table 1 "GIoU Loss"; "smooth_l1" regresses deltas instead
    config.loss.box_loss_weight = 2.0  # multiplier of the box term (ATSS: 2 with GIoU)
    config.loss.focal_alpha = 0.25  # focal loss weight of positives
    config.loss.focal_gamma = 2.0  # focal loss focusing exponent
    config.loss.smooth_l1_beta = 1.0 / 9.0  # where smooth-L1 turns from quadratic to linear (box_loss="smooth_l1")

    config.anchors = ml_collections.ConfigDict()
    config.anchors.strides = (8, 16, 32, 64, 128)
    config.anchors.octave_base_scale = 8.0
    config.anchors.scales = (1.0,)
    config.anchors.aspect_ratios = (1.0,)

    config.assigner = ml_collections.ConfigDict()
    # One of atss_jax.assigners.ASSIGNERS.
    config.assigner.name = "atss"
    config.assigner.topk = 9
    # ATSS only: "grid" (a star of locations per box and level, the fast default) or "full_matrix" (reference);
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

    config.seed = 0  # initialisation, data order and augmentation
    # COCO-size training on a CPU would take months: atss_jax.main refuses it unless --allow_cpu is given.
    config.requires_accelerator = True

    config.train = ml_collections.ConfigDict()
    config.train.global_batch = 16  # over all devices of all hosts
    config.train.num_steps = 90_000  # 1x schedule at batch 16 (about 12 COCO epochs)
    config.train.log_every = 50
    config.train.eval_every = 0  # 0: evaluate at the end only
    config.train.checkpoint_every = 2_000
    config.train.max_checkpoints_to_keep = 3
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
    config.optimizer.warmup_steps = 500
    config.optimizer.warmup_factor = 1.0 / 3.0  # linear warmup from this fraction of the rate
    config.optimizer.lr_milestones = (2.0 / 3.0, 8.0 / 9.0)  # fractions of num_steps (60k and 80k of 90k)
    config.optimizer.lr_decay = 0.1
    config.optimizer.clip_grad_norm = 0.0  # 0: no clipping

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_per_device = 8
    # The official annotations JSON for pycocotools ("" = built from the TFDS split: same numbers).
    config.eval.annotations_file = ""
    # "faster_coco_eval" (C++, same 12 numbers: scripts/benchmark_eval.py checks) or "pycocotools".
    config.eval.evaluator = "faster_coco_eval"
    config.eval.score_threshold = 0.05
    config.eval.pre_nms_topk = 1000
    config.eval.nms_iou_threshold = 0.6
    config.eval.max_detections = 100
    config.eval.num_images_to_draw = 4
    config.eval.draw_score_threshold = 0.3
    # Test-time augmentation (atss_jax/tta.py): short sides of the views, () = off. The long-side cap and the
    # canvas scale with each; `flip` adds each view mirrored. Views merge by class-wise NMS
    # (nms_iou_threshold, max_detections above). No detection images are drawn with TTA.
    config.eval.tta = ml_collections.ConfigDict()
    config.eval.tta.min_sizes = ()
    config.eval.tta.flip = False

    return config.lock()


def with_dcnv2(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with modulated deformable convolutions where the paper's DCN rows (and the official
    ``dcnv2`` configs) put them: the 3x3 convs of stages 2-4 (C3-C5) and the last conv of each head tower."""
    config.model.backbone.deformable_stages = (2, 3, 4)
    config.model.head.deformable_tower = True
    return config
