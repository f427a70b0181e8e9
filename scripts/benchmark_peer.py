r"""mmdetection 3.3.0's ATSS R-50-FPN and this project's, side by side: the same weights, the same batch.

Both models start from mmdetection's initial weights (imported with `atss_jax.models.mmdet_import`, the
project's model switched to mmdetection's by `config_for_mmdet`: anchor offset 0, P7 without ReLU, its box
coder) and see the same synthetic batch (random images, `--boxes` random boxes per image). Before any ratio
is printed, the first training step's loss terms of the two must agree (`--rtol`, each term): the two sides
then do the same work. Timed interleaved, medians of `--rounds`:
  train      the whole step: forward, assignment, losses, backward, SGD update (momentum, weight decay)
  inference  forward and post-processing (score threshold, top-k, NMS), no gradients
and each side's assignment share of the training step: ours times its jitted assigner alone on the same
inputs; mmdetection's assigner calls are timed inside its steps.

Deliberate differences (the step's work, not the loss): mmdetection trains the BatchNorm affine parameters of
stages 2-4 (norm_eval, requires_grad), the project's frozen_bn keeps them fixed; mmdetection's loss adds
`torch.finfo(float32).eps` to each average factor (a relative 1e-7).

    python -m scripts.benchmark_peer                                          # this CPU: 2 images at 512x512
    python -m scripts.benchmark_peer --device=gpu --canvas=800,1344 --batch=8 --dtype=bfloat16
    python -m scripts.benchmark_peer --device=cpu --smoke --out=/tmp/peer.json    # CI-sized
    python -m scripts.benchmark_peer --profile                                # per op class, one thread

`--profile` pins the process to one core, runs XLA:CPU's Eigen single-threaded and torch on one thread, so
that every op's time is its own (with threads, XLA's concurrent thunks overlap in a trace), and prints one
training step of each side split into convolutions and matmuls (forward, backward), layout copies and the
rest (normalisations, activations, losses, assignment, update).

On a GPU, float32 runs at full float32 on both sides (no TF32: JAX's matmul precision "highest", torch's
cudnn/matmul allow_tf32 off). Without a CUDA torch or mmdetection, only the project's side runs and the
ratio is null, with the reason in the JSON.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags
from etils import epath

from atss_jax import inference, parallel, train_step, xla_flags
from atss_jax.anchors import anchor_valid_mask, build_anchor_grid
from atss_jax.models import mmdet_import
from configs import base
from scripts import benchmark_common
from scripts.benchmark_common import PEAK_TFLOPS, synthetic_batch

# PyTorch's OpenMP threads busy-wait after each op (OpenMP's active wait policy) and take the CPU from the XLA
# step that follows in this interleaved run (here: our step 5.7 s instead of 4.0 s, mmdetection's 2.7 s instead of
# 2.9 s); waiting passively is fair to both. Read when torch loads its OpenMP runtime, so set before any import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where both sides run.")
_CANVAS = flags.DEFINE_list("canvas", None, "height,width, multiples of 32; default 512,512 (smoke 128,128).")
_BATCH = flags.DEFINE_integer("batch", None, "Images per batch (one device); default 2 (GPU 8).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype: ours model.dtype, mmdetection's torch.autocast.")
_ROUNDS = flags.DEFINE_integer("rounds", None, "Timed rounds after a warm-up; default 5 (smoke 1).")
_BOXES = flags.DEFINE_integer("boxes", 10, "Boxes per image.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 80, "Classes of both heads.")
_RTOL = flags.DEFINE_float("rtol", None, "Agreement of each first-step loss term; default 1e-4 (bfloat16 3e-2).")
_SMOKE = flags.DEFINE_bool("smoke", False, "CI size: 128x128 canvas, 4 boxes, one timed round.")
_OUT = flags.DEFINE_string("out", "benchmark_peer.json", "JSON output.")
_PROFILE = flags.DEFINE_bool("profile", False,
                             "CPU: run both sides on one core and thread, and print each side's time per op class "
                             "for one training step (XLA's thunk trace, torch.profiler).")

LOSS_TERMS = {"classification": "loss_cls", "box": "loss_bbox", "centerness": "loss_centerness"}


def project_config(canvas: tuple[int, int], batch: int, boxes: int, num_classes: int, dtype: str):
    """configs/base.py switched to mmdetection's model (``mmdet_import.config_for_mmdet``) at this size."""
    config = mmdet_import.config_for_mmdet(base.get_config())
    config.data.canvas = canvas
    config.data.aspect_ratio_buckets = False  # one canvas, as given
    config.data.max_boxes = boxes
    config.model.num_classes = num_classes
    config.model.dtype = dtype
    config.train.global_batch = batch
    return config


class MmdetSide:
    """mmdetection's ATSS (``scripts/mmdet_peer.py``) with its training step and inference on one batch."""

    def __init__(self, num_classes: int, device: str, dtype: str, lr: float):
        import torch

        from scripts import mmdet_peer

        self.torch = torch
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.autocast = dtype == "bfloat16"
        self.model = mmdet_peer.build_model(mmdet_peer.atss_r50_config(num_classes=num_classes)).to(self.device)
        self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=lr,
                                         momentum=0.9, weight_decay=1e-4)
        self.assign_seconds = 0.0
        assigner = self.model.bbox_head.assigner
        assign = assigner.assign

        def timed_assign(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            result = assign(*args, **kwargs)
            self._sync()
            self.assign_seconds += time.perf_counter() - start
            return result

        assigner.assign = timed_assign

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}

    def data(self, batch: dict[str, np.ndarray]) -> dict:
        """The batch as mmdetection's data loader hands it over: BGR uint8 [3, H, W] (its preprocessor turns
        them to RGB, normalises and pads) and DetDataSamples with the boxes."""
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        torch = self.torch
        inputs, samples = [], []
        for image, size, boxes, labels, valid in zip(batch["image"], batch["image_size"], batch["boxes"],
                                                     batch["labels"], batch["box_valid"]):
            inputs.append(torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1))))
            shape = tuple(int(s) for s in size)
            sample = DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, scale_factor=(1.0, 1.0)))
            sample.gt_instances = InstanceData(bboxes=torch.from_numpy(boxes[valid]),
                                               labels=torch.from_numpy(labels[valid].astype(np.int64)))
            samples.append(sample)
        return {"inputs": inputs, "data_samples": samples}

    def _context(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.autocast)

    def train_step(self, data: dict) -> dict[str, float]:
        """One SGD step; the loss terms (summed over levels) before the update."""
        self.model.train()  # its ResNet keeps the frozen stages and every BatchNorm in eval mode
        self.optimizer.zero_grad(set_to_none=True)
        with self._context():
            batch = self.model.data_preprocessor(data, training=True)
            terms = self.model.loss(batch["inputs"], batch["data_samples"])
        loss, _ = self.model.parse_losses(terms)
        loss.backward()
        self.optimizer.step()
        self._sync()
        return {ours: float(sum(t.detach().float() for t in terms[theirs])) for ours, theirs in LOSS_TERMS.items()}

    def profile(self, data: dict) -> tuple[dict[str, float], float]:
        """One training step under torch.profiler: seconds of each op class (``OP_CLASSES``), self times, and the
        step's own wall seconds."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as trace:
            step_seconds = _timed(lambda: self.train_step(data))
        seconds = dict.fromkeys(OP_CLASSES, 0.0)
        for op in trace.key_averages():
            name = op.key
            if "convolution_backward" in name or "conv2d_backward" in name or "conv_depthwise2d_backward" in name:
                kind = "conv_backward"
            elif "convolution" in name or "conv2d" in name or name in ("aten::addmm", "aten::mm", "aten::bmm"):
                kind = "conv_forward"
            elif name in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy"):
                kind = "layout"
            else:
                kind = "other"
            seconds[kind] += op.self_cpu_time_total / 1e6
        return seconds, step_seconds

    def predict(self, data: dict) -> None:
        self.model.eval()
        with self.torch.no_grad(), self._context():
            batch = self.model.data_preprocessor(data, training=False)
            self.model.predict(batch["inputs"], batch["data_samples"], rescale=False)
        self._sync()


OP_CLASSES = {"conv_forward": "convolutions and matmuls, forward",
              "conv_backward": "convolutions and matmuls, backward (input and kernel gradients)",
              "layout": "layout copies (transposes, contiguous copies)",
              "other": "everything else (norms, activations, losses, assignment, update)"}


def _one_thread() -> None:
    """Pins the process to one core and XLA's Eigen to its calling thread; before JAX's backend starts."""
    if xla_flags.backend_started():
        raise SystemExit("--profile: JAX's backend started before the flags could be set")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _profile_ours(compiled: jax.stages.Compiled, run_step: Callable[[], object], directory: str
                  ) -> tuple[dict[str, float], float]:
    """One training step under jax.profiler: seconds of each op class, read from XLA:CPU's thunk events, whose
    HLO instruction's metadata says forward or backward (``transpose(jvp(...))``), and the step's wall seconds."""
    import gzip

    op_names = dict(re.findall(r'^\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"', compiled.as_text(), re.MULTILINE))
    jax.profiler.start_trace(directory)
    step_seconds = _timed(run_step)
    jax.profiler.stop_trace()
    trace = sorted(epath.Path(directory).glob("plugins/profile/*/*.trace.json.gz"))[-1]
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    seconds = dict.fromkeys(OP_CLASSES, 0.0)
    for event in events:
        op = event.get("args", {}).get("hlo_op")
        if event.get("ph") != "X" or op is None or event["args"].get("hlo_module") != "jit_train_step":
            continue
        if op.startswith(("conv", "dot", "ynn_fusion", "onednn")):
            kind = "conv_backward" if "transpose(jvp(" in op_names.get(op, "") else "conv_forward"
        elif "copy" in op or "transpose" in op:
            kind = "layout"
        else:
            kind = "other"
        seconds[kind] += event["dur"] / 1e6
    return seconds, step_seconds


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _versions() -> dict[str, str | None]:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in ("jax", "jaxlib", "flax", "torch", "mmdet", "mmengine", "mmcv-lite")}


def main(argv):
    del argv
    if _PROFILE.value:
        if _DEVICE.value != "cpu":
            raise SystemExit("--profile is for --device=cpu (a GPU's kernels need its own profiler)")
        _one_thread()
    if _DEVICE.value == "cpu":
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() != "gpu":
        raise SystemExit(f"--device=gpu but jax's backend is {jax.default_backend()}")
    if _DTYPE.value == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on a GPU; a no-op on the CPU
    smoke = _SMOKE.value
    canvas = tuple(int(v) for v in _CANVAS.value) if _CANVAS.value else ((128, 128) if smoke else (512, 512))
    if len(canvas) != 2 or any(v % 32 for v in canvas):
        raise SystemExit(f"--canvas={','.join(map(str, canvas))}: two multiples of 32 (height,width)")
    batch_size = _BATCH.value or (8 if _DEVICE.value == "gpu" else 2)
    boxes = 4 if smoke else _BOXES.value
    rounds = _ROUNDS.value or (1 if smoke else 5)
    rtol = _RTOL.value or (1e-4 if _DTYPE.value == "float32" else 3e-2)

    config = project_config(canvas, batch_size, boxes, _NUM_CLASSES.value, _DTYPE.value)
    host = synthetic_batch(config, batch_size, np.random.default_rng(0))
    host["scale"] = np.ones(batch_size, np.float32)
    learning_rate = float(train_step.learning_rate_schedule(config)(0))

    peer, peer_missing = None, None
    try:
        import torch

        if _DEVICE.value == "gpu":
            if not torch.cuda.is_available():
                raise ImportError(f"torch {torch.__version__} sees no CUDA device")
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        if _PROFILE.value:
            torch.set_num_threads(1)
        peer = MmdetSide(_NUM_CLASSES.value, _DEVICE.value, _DTYPE.value, learning_rate)
    except ImportError as error:
        if _DEVICE.value == "cpu":
            raise
        peer_missing = f"mmdetection side not run: {error}"
        print(peer_missing, flush=True)

    begin = time.perf_counter()
    training = train_step.create_training(config)
    if peer is not None:
        variables = mmdet_import.convert_state_dict(peer.state_dict(), config)
        params = variables.pop("params")
        state = jax.device_put(
            train_step.TrainState(step=training.state.step, params=params, model_state=variables,
                                  opt_state=training.optimizer.init(params),
                                  nonfinite_step=training.state.nonfinite_step),
            jax.sharding.NamedSharding(training.mesh, parallel.REPLICATED_SPEC))
    else:
        state = training.state
    source = "from mmdetection's weights" if peer is not None else "ours only"
    print(f"Built the models ({source}) in {time.perf_counter() - begin:.1f} s.", flush=True)

    mesh = training.mesh
    train_batch = parallel.to_global({k: v for k, v in host.items() if k != "scale"}, mesh)
    start = time.perf_counter()
    lowered = train_step.compile_train_step(config, training.model, training.optimizer, mesh).lower(
        state, train_batch)
    train_fn = lowered.compile()
    compile_seconds = time.perf_counter() - start
    flops = benchmark_common.flops(lowered, train_fn)
    eval_fn = jax.jit(functools.partial(inference.eval_step, config=config, model=training.model))
    grid = build_anchor_grid(config.anchors, canvas)
    assign_fn = jax.jit(functools.partial(train_step.assign_batch, grid, config=config))
    device_batch = jax.device_put(host)
    anchor_valid = anchor_valid_mask(grid.centers, device_batch["image_size"])
    counted = f"{flops / 1e9:.1f} GFLOPs" if flops else "FLOPs not counted"
    print(f"Compiled our train step in {compile_seconds:.1f} s ({counted}).", flush=True)

    # The first step of each side: the loss agreement, then the warm-up of everything timed.
    state, metrics = train_fn(state, train_batch)
    ours_first = {term: float(metrics[f"loss_{term}"]) for term in LOSS_TERMS}
    eval_variables = {"params": state.params, **state.model_state}
    jax.block_until_ready(eval_fn(eval_variables, device_batch))
    jax.block_until_ready(assign_fn(anchor_valid, device_batch))
    agreement = None
    if peer is not None:
        data = peer.data(host)
        theirs_first = peer.train_step(data)
        peer.predict(data)
        agreement = {term: {"ours": ours_first[term], "mmdet": theirs_first[term],
                            "relative": abs(ours_first[term] - theirs_first[term]) / max(abs(theirs_first[term]),
                                                                                         1e-12)}
                     for term in LOSS_TERMS}
        print("First step's losses (same weights, same batch):\n| term | ours | mmdetection | relative |\n"
              "|---|---:|---:|---:|")
        for term, row in agreement.items():
            print(f"| {term} | {row['ours']:.6g} | {row['mmdet']:.6g} | {row['relative']:.2e} |")
    agree = agreement is not None and all(row["relative"] <= rtol for row in agreement.values())

    times = {key: [] for key in ("train", "inference", "assign", "mmdet_train", "mmdet_inference", "mmdet_assign")}
    def step():
        nonlocal state
        state, step_metrics = train_fn(state, train_batch)
        jax.block_until_ready(step_metrics)

    for _ in range(rounds):  # interleaved, so drifts of a shared machine hit both sides alike
        times["train"].append(_timed(step))
        times["inference"].append(_timed(lambda: jax.block_until_ready(
            eval_fn({"params": state.params, **state.model_state}, device_batch))))
        times["assign"].append(_timed(lambda: jax.block_until_ready(assign_fn(anchor_valid, device_batch))))
        if peer is not None:
            peer.assign_seconds = 0.0
            times["mmdet_train"].append(_timed(lambda: peer.train_step(data)))
            times["mmdet_assign"].append(peer.assign_seconds)
            times["mmdet_inference"].append(_timed(lambda: peer.predict(data)))
        print("Round: " + ", ".join(f"{key} {value[-1]:.3g} s" for key, value in times.items() if value), flush=True)
    median = {key: float(np.median(value)) if value else None for key, value in times.items()}
    profile, profile_step_seconds = None, None
    if _PROFILE.value:
        with tempfile.TemporaryDirectory() as directory:
            ours, ours_step_seconds = _profile_ours(train_fn, step, directory)
        profile, profile_step_seconds = {"ours": ours}, {"ours": ours_step_seconds}
        if peer is not None:
            profile["mmdet"], profile_step_seconds["mmdet"] = peer.profile(data)

    def per_second(seconds):
        return batch_size / seconds if seconds else None

    result = {
        "device": jax.devices()[0].device_kind, "platform": platform.platform(), "versions": _versions(),
        "canvas": canvas, "batch_per_device": batch_size, "dtype": _DTYPE.value, "boxes_per_image": boxes,
        "num_classes": _NUM_CLASSES.value, "rounds": rounds, "compile_seconds": compile_seconds,
        "images_per_second": per_second(median["train"]),
        "mmdet_images_per_second": per_second(median["mmdet_train"]),
        "inference_images_per_second": per_second(median["inference"]),
        "mmdet_inference_images_per_second": per_second(median["mmdet_inference"]),
        "step_ms": 1000 * median["train"],
        "assignment_share": median["assign"] / median["train"],
        "mmdet_assignment_share": median["mmdet_assign"] / median["mmdet_train"] if peer is not None else None,
        "loss_agreement": agreement, "rtol": rtol, "losses_agree": agree, "peer_missing": peer_missing,
        "mfu": None, "peak_memory_gib": None, "load_average_1_5_15min": os.getloadavg(),
        "one_thread": _PROFILE.value, "profile_seconds": profile, "profile_step_seconds": profile_step_seconds,
    }
    peak = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in result["device"].lower()), None)
    if _DEVICE.value == "gpu":
        result["mfu"] = flops / median["train"] / 1e12 / peak if peak and flops else None
        stats = jax.local_devices()[0].memory_stats() or {}
        result["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None
    if agree:
        result["train_ratio"] = result["images_per_second"] / result["mmdet_images_per_second"]
        result["inference_ratio"] = result["inference_images_per_second"] / result["mmdet_inference_images_per_second"]
    epath.Path(_OUT.value).write_text(json.dumps(result, indent=1))

    print(f"\nATSS R-50-FPN, {result['device']}, canvas {canvas[0]}x{canvas[1]}, batch {batch_size}, {_DTYPE.value}, "
          f"{boxes} boxes/image, {_NUM_CLASSES.value} classes; medians of {rounds} interleaved rounds.")
    print("| side | train img/s | inference img/s | assignment share of the step |\n|---|---:|---:|---:|")

    def number(value, digits=3):
        return f"{value:.{digits}g}" if value is not None else "-"

    print(f"| this project | {number(result['images_per_second'])} | {number(result['inference_images_per_second'])} "
          f"| {100 * result['assignment_share']:.3g}% |")
    if peer is not None:
        print(f"| mmdetection {result['versions']['mmdet']} | {number(result['mmdet_images_per_second'])} | "
              f"{number(result['mmdet_inference_images_per_second'])} | "
              f"{100 * result['mmdet_assignment_share']:.3g}% |")
    if agree:
        print(f"| project / mmdetection | {result['train_ratio']:.2f}x | {result['inference_ratio']:.2f}x | |")
    if profile:
        print("\nOne training step on one thread, seconds per op class:\n| op class | this project | mmdetection |\n"
              "|---|---:|---:|")
        mmdet_profile = profile.get("mmdet", {})
        for kind, label in {**OP_CLASSES, "sum": "sum"}.items():
            ours = sum(profile["ours"].values()) if kind == "sum" else profile["ours"][kind]
            theirs = sum(mmdet_profile.values()) if kind == "sum" else mmdet_profile.get(kind)
            print(f"| {label} | {ours:.3f} | {f'{theirs:.3f}' if mmdet_profile else '-'} |")
    if peer is not None and not agree:
        raise SystemExit(f"No ratio: the first step's losses differ by more than rtol={rtol} (table above), so the "
                         "two sides do not do the same work.")


if __name__ == "__main__":
    app.run(main)
