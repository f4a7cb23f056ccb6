"""Training-throughput benchmark of a config, optionally against the same network in PyTorch.

`benchmark(config)` times the real training path (`train.make_train_steps`: one jitted
`lax.scan` over a chunk of steps, batches gathered from device-resident uint8 data) after
compilation and warm-up, and reports images/s, compile time, peak RSS, achieved GFLOP/s and
its fraction of the machine's peak, measured in the same run as the best rate of a large fp32
matmul (`matmul_gflops`, before and after the timed steps: the better of the two, since a slow
phase of a shared VM can last seconds), and of the brief's nominal 157 GFLOP/s. Training FLOPs
per image are counted as 3 x forward MACs x 2 (forward, input-gradient and weight-gradient
passes; one MAC is two FLOPs).

With `peer="torch"` the same architecture is translated layer by layer to PyTorch
(`to_torch`), trained with the same batch size, optimizer, learning rate, loss, data shape,
preprocessing and augmentation for the same number of steps, and timed the same way, in rounds
that alternate with ours (`PEER_ROUNDS`), so that the ratio compares the two at the same minutes
of the machine; `round_ratios` are each round's own, and `ratio_median` their median, which a
slow phase of the machine during a few rounds moves less than the overall `ratio`. torch is
imported only then: `cnn` does not require it. On a machine busy with other work, torch's
default OpenMP spin-waiting with 2 threads can slow it many-fold; `OMP_WAIT_POLICY=PASSIVE` in
the environment avoids that (recorded in the result as omp_wait_policy), as does an idle machine.
"""

from __future__ import annotations

import collections
import math
import os
import pathlib
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn import augment, layers, model_summary, models, native, step_profile, train
from cnn.geometry import pair, resolve_padding
from cnn.nn import (
    Activation,
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Flatten,
    GlobalAvgPool,
    MaxPool,
    Sequential,
)

Array = jax.Array

# The brief's fp32 peak for its 2-core Zen 3 (AVX2) machine: 2 cores x 2 FMA units x 8 lanes x
# 2 FLOPs x ~2.45 GHz. Reported beside the measured peak so older figures stay comparable; the
# development machine turned out to be a 2-core Zen 5 with AVX-512, where XLA's fp32 matmul
# alone runs at 385-473 GFLOP/s (BENCHMARKS.md).
NOMINAL_PEAK_GFLOPS = 157.0
# With a peer, our timed chunks and the peer's steps alternate in up to this many rounds by
# default: a machine whose speed swings from minute to minute then slows both alike.
PEER_ROUNDS = 4
MATMUL_N = 2048
IMAGE_SHAPE_HWC = (28, 28, 1)  # MNIST
NUM_CLASSES = 10
SYNTHETIC_EXAMPLES = 10_000
REQUIRED_KEYS = ("images_per_s", "peer_images_per_s", "ratio", "gflops", "peak_fraction")


class TranslationError(ValueError):
    """A layer or setting with no exact PyTorch equivalent."""


class ArgumentError(ValueError):
    """A benchmark argument (peer, steps, warmup, peak) that cannot work."""


# ----------------------------------------------------------------------------- measurements
def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def forward_macs(model: Sequential, image_shape_HWC=IMAGE_SHAPE_HWC) -> int:
    """Multiply-accumulates of one example's forward pass (sum of the summary rows)."""
    return sum(row.macs for row in model_summary.rows(model, (1, *image_shape_HWC)))


def training_gflops(macs: int, images_per_s: float) -> float:
    """Achieved GFLOP/s: 3 passes x MACs x 2 FLOPs per MAC x images/s."""
    return 3 * macs * 2 * images_per_s / 1e9


def host_cpu() -> str:
    """The CPU's model, family and widest vector extension (x86 /proc/cpuinfo), else its arch."""
    try:
        first_cpu = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        first_cpu = ""
    info = dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition(":") for line in first_cpu.splitlines())
    )
    flags = info.get("flags", "").split()
    simd = next((f for f in ("avx512f", "avx2", "sse2") if f in flags), "")
    family = f"family {info['cpu family']}" if "cpu family" in info else ""
    parts = [x for x in (info.get("model name", ""), family, simd) if x]
    return ", ".join(parts) or platform.processor() or platform.machine()


def matmul_gflops(n: int | None = None, repeats: int = 10, clock=time.perf_counter) -> float:
    """Best fp32 GFLOP/s of a jitted n x n matmul on the default device: a practical peak.

    n defaults to 2048 on a CPU and 8192 elsewhere; default precision (TF32 where a GPU
    uses it for training too).
    """
    if n is None:
        n = MATMUL_N if jax.default_backend() == "cpu" else 4 * MATMUL_N
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a_NN = jax.random.normal(key_a, (n, n), jnp.float32)
    b_NN = jax.random.normal(key_b, (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / _best_seconds(lambda: matmul(a_NN, b_NN), repeats, clock) / 1e9


def _best_seconds(run: Callable[[], Any], repeats: int, clock) -> float:
    """Fastest of `repeats` timed calls of `run`, after one untimed call (compile, warm-up)."""
    jax.block_until_ready(run())
    best = math.inf
    for _ in range(repeats):
        t = clock()
        jax.block_until_ready(run())
        best = min(best, clock() - t)
    return best


def time_conv_impls(
    x_shape_BHWC: tuple[int, ...],
    w_shape_HWIO: tuple[int, ...],
    *,
    padding: Any = "VALID",
    impls: tuple[str, ...] | None = None,
    input_grad: bool = True,
    steps: int = 8,
    repeats: int = 5,
    clock=time.perf_counter,
) -> dict[str, float]:
    """Milliseconds per forward + backward of `layers.conv2d` under each lowering.

    Timed as training runs it: `steps` gradient steps in one jitted `lax.scan`, best of
    `repeats` after a warm-up call. input_grad=False leaves out the input gradient (a network's
    first layer). impls: default every lowering that applies to the geometry.
    """
    if steps < 1 or repeats < 1:
        raise ArgumentError(f"need steps >= 1 and repeats >= 1, got {steps} and {repeats}")
    k_x, k_w, k_g = jax.random.split(jax.random.PRNGKey(0), 3)
    x_BHWC = jax.random.normal(k_x, tuple(x_shape_BHWC), jnp.float32)
    w_HWIO = 0.1 * jax.random.normal(k_w, tuple(w_shape_HWIO), jnp.float32)
    try:  # the geometry itself, with the lowering that takes every one
        jax.eval_shape(
            lambda x, w: layers.conv2d(x, w, padding=padding, impl="xla"), x_BHWC, w_HWIO
        )
    except (ValueError, AssertionError) as e:
        raise ArgumentError(str(e)) from None
    applicable = {}
    for impl in impls or layers.CONV_IMPLS:
        try:
            applicable[impl] = jax.eval_shape(
                lambda x, w, impl=impl: layers.conv2d(x, w, padding=padding, impl=impl),
                x_BHWC,
                w_HWIO,
            )
        except (ValueError, native.NativeError) as e:
            if impls:  # asked for by name: say why it cannot run
                raise ArgumentError(str(e)) from None
    times = {}
    for impl, y_spec in applicable.items():
        loss = conv_loss(impl, padding, jax.random.normal(k_g, y_spec.shape, jnp.float32))

        def body(xw, _, loss=loss):
            x, w = xw
            if input_grad:
                dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
                return (x - 1e-6 * dx, w - 1e-6 * dw), None
            return (x, w - 1e-6 * jax.grad(loss, argnums=1)(x, w)), None

        run = jax.jit(lambda xw, body=body: jax.lax.scan(body, xw, None, length=steps)[0])
        best = _best_seconds(lambda run=run: run((x_BHWC, w_HWIO)), repeats, clock)
        times[impl] = best / steps * 1e3
    return times


def conv_loss(impl: str, padding: Any, target_BHWO: Array) -> Callable[[Array, Array], Array]:
    """Squared error of `conv2d` against a target: its gradients depend on both x and w.

    (A loss linear in the output has a kernel gradient that does not depend on w; with the
    input fixed, XLA hoists it out of the timed scan and the step times nothing.)
    """

    def loss(x_BHWC, w_HWIO):
        y_BHWO = layers.conv2d(x_BHWC, w_HWIO, padding=padding, impl=impl)
        return 0.5 * jnp.sum(jnp.square(y_BHWO - target_BHWO))

    return loss


def synthetic_mnist(n: int = SYNTHETIC_EXAMPLES, seed: int = 0):
    """Random uint8 images (N, 28, 28, 1) and int32 labels (N,): MNIST's shapes and dtypes."""
    rng = np.random.default_rng(seed)
    images_NHWC = rng.integers(0, 256, (n, *IMAGE_SHAPE_HWC), dtype=np.uint8)
    labels_N = rng.integers(0, NUM_CLASSES, (n,), dtype=np.int32)
    return images_NHWC, labels_N


def _layer_key(layer: Any, index: int) -> str:
    """The layer's key in the Flax variable tree (Sequential's members are layers_<i>)."""
    return layer.name if layer.name else f"layers_{index}"


def _chunk_inputs(n: int, batch_size: int, chunk: int, n_chunks: int, seed: int):
    """n_chunks device-resident (idx_SB, mask_SB, valid_S) tuples of random full batches."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_chunks):
        idx_SB = rng.integers(0, n, (chunk, batch_size), dtype=np.int32)
        mask_SB = np.ones((chunk, batch_size), np.float32)
        valid_S = np.ones((chunk,), np.int32)
        out.append(jax.device_put((idx_SB, mask_SB, valid_S)))
    return out


def _time_ours(
    config,
    model: Sequential,
    images_NHWC,
    labels_N,
    steps: int,
    warmup: int,
    profile: bool,
    make_peer: Callable[[], TorchPeer] | None = None,
    peer_rounds: int = PEER_ROUNDS,
):
    """(our seconds per round, timed steps, compile seconds, params, peak RSS in MB, profile
    or None, the peer's seconds per round or None).

    make_peer: builds the peer after our warm-up; it warms up too, then our timed chunks run in
    up to peer_rounds rounds, each followed by as many of the peer's steps, so that both see the
    same minutes of the machine. The RSS is read after the timed steps, or with a peer before it
    is built (after our warm-up); profile=True then runs one more chunk under the profiler
    (`cnn.step_profile`), which itself needs memory.
    """
    chunk = train.dispatch_steps(config, steps)
    n_timed = -(-steps // chunk)
    n_warm = -(-warmup // chunk) if warmup else 0
    tx, _ = train.make_optimizer(config, steps_per_epoch=max(steps, 1))
    state = train.init_state(model, tx, config, images_NHWC.shape[1:])
    params = train.num_params(state.params)
    data = jax.device_put((images_NHWC, labels_N))
    n_chunks = n_warm + n_timed + int(profile)
    chunks = _chunk_inputs(len(labels_N), config.batch_size, chunk, n_chunks, config.seed)

    t = time.perf_counter()
    compiled = train.make_train_steps(model, tx, config).lower(state, *data, *chunks[0]).compile()
    compile_s = time.perf_counter() - t

    for chunk_args in chunks[:n_warm]:
        state, metrics = compiled(state, *data, *chunk_args)
    jax.block_until_ready((state, metrics) if n_warm else state)
    peer, peer_seconds, rss_mb = None, None, None
    if make_peer is not None:
        rss_mb = peak_rss_mb()  # ours alone: torch's memory would count once it is built
        peer, peer_seconds = make_peer(), []
        peer.run(warmup)
    timed = chunks[n_warm : n_warm + n_timed]
    rounds = min(peer_rounds, n_timed) if peer is not None else 1
    seconds = []
    for r in range(rounds):
        part = timed[r * n_timed // rounds : (r + 1) * n_timed // rounds]
        t = time.perf_counter()
        for chunk_args in part:
            state, metrics = compiled(state, *data, *chunk_args)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - t)
        if peer is not None:
            peer_seconds.append(peer.run(len(part) * chunk))
    rss_mb = peak_rss_mb() if rss_mb is None else rss_mb
    profiled = None
    if profile:
        shapes = model.output_shapes((1, *images_NHWC.shape[1:]))
        names = {
            i: f"{name} -> {'x'.join(map(str, shape[1:]))}"
            for i, (name, shape) in enumerate(zip(model.names, shapes, strict=True))
        }
        profiled, (state, metrics) = step_profile.profile_compiled(
            compiled, (state, *data, *chunks[-1]), steps=chunk, layer_names=names
        )
    loss = float(metrics["loss_sum"]) / max(float(metrics["count"]), 1.0)
    if not math.isfinite(loss):
        raise FloatingPointError(f"training diverged while benchmarking: loss {loss}")
    return seconds, n_timed * chunk, compile_s, params, rss_mb, profiled, peer_seconds


def benchmark(
    config: ml_collections.ConfigDict,
    *,
    steps: int = 256,
    warmup: int = 64,
    peer: str | None = None,
    peak_gflops: float | None = None,
    config_name: str | None = None,
    profile: bool = False,
    peer_rounds: int = PEER_ROUNDS,
) -> dict[str, Any]:
    """Training throughput of config's network at its batch size; see the module docstring.

    steps: timed training steps (rounded up to whole chunks of config.steps_per_dispatch);
    warmup: untimed steps run first, after compilation. peer: None or "torch", timed in up to
    peer_rounds rounds alternating with ours (1: all of ours, then all of the peer's).
    peak_gflops: the machine's peak; None measures it (`matmul_gflops`, in this run: the better
    of a measurement before our steps and one after the timing).
    peak_rss_mb is ours: read after our timed steps (with a peer, after our warm-up, before
    the peer is built), before any profiling; peer_peak_rss_mb (the process's peak at the end)
    includes ours. profile=True adds "profile":
    where one more chunk's step time goes (`cnn.step_profile.StepProfile.as_dict`).
    """
    if peer not in (None, "torch"):
        raise ArgumentError(f"peer must be None or 'torch', got {peer!r}")
    if peer_rounds < 1:
        raise ArgumentError(f"peer_rounds must be >= 1, got {peer_rounds}")
    if steps < 1 or warmup < 0:
        raise ArgumentError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if peak_gflops is not None and not peak_gflops > 0:
        raise ArgumentError(f"peak_gflops must be > 0 or None (measure it), got {peak_gflops!r}")
    train.validate_config(config)
    model = train.logits_model(models.get(config.model))
    macs = forward_macs(model)
    images_NHWC, labels_N = synthetic_mnist(seed=config.seed)

    device = jax.devices()[0]
    peer_device = torch_device(device.platform) if peer == "torch" else None
    make_peer = None
    if peer == "torch":

        def make_peer():
            return TorchPeer(config, model, images_NHWC, labels_N, peer_device)

    peak_runs = [matmul_gflops()]
    round_s, timed_steps, compile_s, params, rss_mb, profiled, peer_round_s = _time_ours(
        config, model, images_NHWC, labels_N, steps, warmup, profile, make_peer, peer_rounds
    )
    seconds = sum(round_s)
    images_per_s = timed_steps * config.batch_size / seconds
    gflops = training_gflops(macs, images_per_s)
    peak_runs.append(matmul_gflops())
    measured_peak = max(peak_runs)
    peak = measured_peak if peak_gflops is None else peak_gflops
    result: dict[str, Any] = {
        "config": config_name if config_name is not None else config.model,
        "model": config.model,
        "batch_size": config.batch_size,
        "steps": timed_steps,
        "warmup_steps": warmup,
        "steps_per_dispatch": train.dispatch_steps(config, steps),
        "images_per_s": images_per_s,
        "seconds": seconds,
        "compile_s": compile_s,
        "peak_rss_mb": rss_mb,
        "params": params,
        "macs": macs,
        "gflops": gflops,
        "matmul_gflops": measured_peak,
        "matmul_gflops_runs": peak_runs,
        "peak_gflops": peak,
        "peak_source": "measured: fp32 matmul" if peak_gflops is None else "given",
        "peak_fraction": gflops / peak,
        "nominal_peak_gflops": NOMINAL_PEAK_GFLOPS,
        "nominal_peak_fraction": gflops / NOMINAL_PEAK_GFLOPS,
        "device": device.device_kind,
        "platform": device.platform,
        "host_cpu": host_cpu(),
        "load_avg_1m": os.getloadavg()[0],
        "peer": peer,
        "peer_images_per_s": None,
        "ratio": None,
    }
    if profiled is not None:
        conv_s = profiled.kind_busy_ms[step_profile.LIBRARY] / 1e3
        result["profile"] = {
            **profiled.as_dict(),
            # a step's training FLOPs over the time some matmul/conv op was running
            "matmul_conv_gflops": training_gflops(macs, config.batch_size / conv_s)
            if conv_s
            else None,
        }
    if peer == "torch":
        peer_seconds = sum(peer_round_s)
        peer_images_per_s = timed_steps * config.batch_size / peer_seconds
        # each round ran the same steps on both sides, next to each other in time
        round_ratios = [p / o for o, p in zip(round_s, peer_round_s, strict=True)]
        result.update(
            peer_images_per_s=peer_images_per_s,
            peer_seconds=peer_seconds,
            peer_gflops=training_gflops(macs, peer_images_per_s),
            peer_peak_rss_mb=peak_rss_mb(),
            ratio=images_per_s / peer_images_per_s,
            round_ratios=round_ratios,
            ratio_median=float(np.median(round_ratios)),
            peer_device=peer_device,
            peer_threads=2 if peer_device == "cpu" else None,
            peer_rounds=len(round_ratios),
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
        )
    return result


# ----------------------------------------------------------------------------- PyTorch peer
def _torch_padding(padding, kernel, stride, dilation, where: str):
    """Our padding as torch's: an (h, w) pair, or 'same' (stride 1 only)."""
    if isinstance(padding, str) and padding.upper() == "SAME":
        if stride != (1, 1):
            raise TranslationError(f"{where}: padding 'SAME' with stride {stride} (torch: 1 only)")
        return "same"
    (top, bottom), (left, right) = resolve_padding(padding, (1, 1), kernel, stride, dilation)
    if top != bottom or left != right:
        raise TranslationError(f"{where}: asymmetric padding {padding!r} has no torch equivalent")
    return (top, left)


def _torch_activation(name: str, where: str):
    import torch.nn as tnn

    table = {
        "relu": tnn.ReLU,
        "leaky_relu": lambda: tnn.LeakyReLU(0.01),
        "elu": tnn.ELU,
        "gelu": tnn.GELU,
        "silu": tnn.SiLU,
        "sigmoid": tnn.Sigmoid,
        "tanh": tnn.Tanh,
        "softplus": lambda: tnn.Softplus(threshold=1e9),  # ours is exact log(1 + e^x)
        "softmax": lambda: tnn.Softmax(dim=1),  # ours is over channels, NCHW's dim 1
        "log_softmax": lambda: tnn.LogSoftmax(dim=1),
        "identity": tnn.Identity,
    }
    if name not in table:
        raise TranslationError(f"{where}: activation {name!r} has no torch translation")
    return table[name]()


def to_torch(model: Sequential, image_shape_HWC=IMAGE_SHAPE_HWC):
    """The same network as a torch.nn.Sequential on NCHW input; children named as Flax names ours.

    Conv -> Conv2d, BatchNorm -> BatchNorm2d/1d (torch momentum = 1 - ours; torch's running
    variance update is unbiased, ours biased), Dropout -> Dropout, Activation -> its module,
    MaxPool/AvgPool -> MaxPool2d/AvgPool2d, GlobalAvgPool -> AdaptiveAvgPool2d(1) + Flatten,
    Flatten -> NHWC-order flatten (a permute first where the map is larger than 1x1, so logits
    match ours exactly). Raises TranslationError for anything else.
    """
    import torch
    import torch.nn as tnn

    class FlattenNHWC(tnn.Module):
        """Flattens (B, C, H, W) in (H, W, C) order, as ours does on NHWC."""

        def forward(self, x):
            return torch.flatten(x.permute(0, 2, 3, 1), 1)

    children = {}
    shape = (1, *image_shape_HWC)
    for i, layer in enumerate(model.layers):
        key, where = _layer_key(layer, i), f"layer {i} ({type(layer).__name__})"
        if isinstance(layer, Conv):
            kernel = pair(layer.kernel_size, "kernel_size")
            stride = pair(layer.stride, "stride")
            dilation = pair(layer.dilation, "dilation")
            children[key] = tnn.Conv2d(
                shape[-1],
                layer.features,
                kernel,
                stride=stride,
                padding=_torch_padding(layer.padding, kernel, stride, dilation, where),
                dilation=dilation,
                groups=layer.groups,
                bias=layer.use_bias,
            )
        elif isinstance(layer, BatchNorm):
            bn_cls = {4: tnn.BatchNorm2d, 2: tnn.BatchNorm1d}.get(len(shape))
            if bn_cls is None:
                raise TranslationError(f"{where}: BatchNorm on rank-{len(shape)} input")
            bn = bn_cls(shape[-1], eps=layer.eps, momentum=1.0 - layer.momentum)
            bn.weight.requires_grad_(layer.use_scale)  # frozen at 1 / 0 like ours
            bn.bias.requires_grad_(layer.use_bias)
            children[key] = bn
        elif isinstance(layer, Dropout):
            children[key] = tnn.Dropout(layer.rate)
        elif isinstance(layer, Activation):
            children[key] = _torch_activation(layer.fn, where)
        elif isinstance(layer, (MaxPool, AvgPool)):
            window = pair(layer.window, "window")
            stride = window if layer.stride is None else pair(layer.stride, "stride")
            if isinstance(layer.padding, str) and layer.padding.upper() != "VALID":
                raise TranslationError(f"{where}: padding {layer.padding!r} (torch: ints only)")
            padding = _torch_padding(layer.padding, window, stride, (1, 1), where)
            if isinstance(layer, MaxPool):
                children[key] = tnn.MaxPool2d(window, stride, padding)
            else:
                children[key] = tnn.AvgPool2d(window, stride, padding, count_include_pad=True)
        elif isinstance(layer, GlobalAvgPool):
            children[key] = tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Flatten())
        elif isinstance(layer, Flatten):
            children[key] = tnn.Flatten() if math.prod(shape[1:-1]) == 1 else FlattenNHWC()
        else:
            raise TranslationError(f"{where}: no torch translation for {type(layer).__name__}")
        shape = tuple(layer.output_shape(shape))
    return tnn.Sequential(collections.OrderedDict(children))


def torch_num_params(torch_model) -> int:
    """All parameters, as ours counts them (frozen BN scale/bias included)."""
    return sum(p.numel() for p in torch_model.parameters())


def copy_to_torch(variables: dict, model: Sequential, torch_model) -> None:
    """Copies our params and BN statistics into to_torch(model) (Conv kernels HWIO -> OIHW)."""
    import torch

    params, stats = variables["params"], variables.get("batch_stats", {})

    def put(dst, src) -> None:
        src = torch.from_numpy(np.array(src, np.float32))
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"shape mismatch: torch {tuple(dst.shape)} vs ours {tuple(src.shape)}")
        dst.copy_(src)

    children = dict(torch_model.named_children())
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            key = _layer_key(layer, i)
            if isinstance(layer, Conv):
                put(children[key].weight, np.transpose(params[key]["kernel"], (3, 2, 0, 1)))
                if layer.use_bias:
                    put(children[key].bias, params[key]["bias"])
            elif isinstance(layer, BatchNorm):
                bn, scale_C, bias_C = children[key], params[key]["scale"], params[key]["bias"]
                put(bn.weight, scale_C if layer.use_scale else np.ones_like(scale_C))
                put(bn.bias, bias_C if layer.use_bias else np.zeros_like(bias_C))
                put(bn.running_mean, stats[key]["mean"])
                put(bn.running_var, stats[key]["var"])


def _torch_optimizer(config, params):
    """The config's optimizer at its peak learning rate (the schedule's shape costs nothing)."""
    import torch

    lr, wd = config.learning_rate, config.weight_decay
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-8, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, eps=1e-8, weight_decay=wd)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=wd
        )
    raise TranslationError(f"no torch optimizer for {config.optimizer!r}")


def _torch_augment(x_BCHW, max_rotation_deg: float, max_translation_px: float):
    """Random rotation and shift about the centre, bilinear, black outside (like ours)."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x_BCHW.shape
    on = {"device": x_BCHW.device}
    theta_B = torch.deg2rad(torch.empty(b, **on).uniform_(-max_rotation_deg, max_rotation_deg))
    shift_B2 = torch.empty(b, 2, **on).uniform_(-max_translation_px, max_translation_px)
    cos, sin = torch.cos(theta_B), torch.sin(theta_B)
    # Output -> input map in align_corners=True coordinates ([-1, 1] spans pixel centres).
    sx, sy = 2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)
    affine_B23 = torch.stack(
        [
            torch.stack([cos, sin * sx / sy, -shift_B2[:, 1] * sx], 1),
            torch.stack([-sin * sy / sx, cos, -shift_B2[:, 0] * sy], 1),
        ],
        1,
    )
    grid = F.affine_grid(affine_B23, list(x_BCHW.shape), align_corners=True)
    return F.grid_sample(x_BCHW, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def torch_device(platform: str) -> str:
    """The peer's device for ours on `platform`: CUDA beside a GPU, else the CPU."""
    if platform != "gpu":
        return "cpu"  # without importing torch: its memory would count in our peak RSS
    import torch

    if not torch.cuda.is_available():
        raise ArgumentError(
            "JAX runs on a GPU but this torch has no CUDA: the ratio would compare a GPU with a"
            " CPU; install a CUDA build of torch, or benchmark without --peer"
        )
    return "cuda"


# Below glibc's 32 MiB ceiling for its dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX).
LARGE_BLOCK_BYTES = 31 << 20


def free_large_block(nbytes: int = LARGE_BLOCK_BYTES) -> None:
    """Allocates and frees one block of nbytes: glibc then raises its mmap threshold to that
    size (and its trim threshold to twice it), as it does after any process's first large free.

    Before that, glibc maps every block over 128 KiB fresh and unmaps it on free: PyTorch on the
    CPU then takes page faults on each step's activations, and `eip_session1_original` trained
    at 2.6-4.0k images/s in a plain torch process here, against 6.2-10.3k after one 16 MiB
    free (BENCHMARKS.md, 2026-12-02 midday). Ours does not change.
    """
    block = np.empty(nbytes, np.uint8)
    del block


class TorchPeer:
    """The same network, optimizer, data and augmentation trained with PyTorch, step by step.

    device "cpu" uses 2 threads and starts after `free_large_block`, so that the ratio is
    against PyTorch at its faster, not at glibc's first-use allocator state; "cuda" keeps the
    data on the GPU and lets cuDNN pick its algorithms (`cudnn.benchmark`), as a PyTorch user
    on a GPU would.
    """

    def __init__(self, config, model: Sequential, images_NHWC, labels_N, device: str = "cpu"):
        import torch

        if device == "cpu":
            torch.set_num_threads(2)
            free_large_block()
        else:
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(config.seed)
        self.config, self.device, self.torch = config, device, torch
        self.net = to_torch(model).to(device)
        x_spec = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE_HWC), np.float32)
        ours = train.num_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), x_spec)["params"])
        if torch_num_params(self.net) != ours:
            raise AssertionError(
                f"torch model has {torch_num_params(self.net)} parameters, ours {ours}"
            )
        self.net.train()
        self.opt = _torch_optimizer(config, [p for p in self.net.parameters() if p.requires_grad])
        images_NCHW = torch.from_numpy(np.ascontiguousarray(images_NHWC.transpose(0, 3, 1, 2)))
        self.images_NCHW = images_NCHW.to(device)
        self.labels = torch.from_numpy(labels_N.astype(np.int64)).to(device)

    def _step(self):
        import torch.nn.functional as F

        torch, config = self.torch, self.config
        rot, shift = config.augment.rotation_deg, config.augment.translation_px
        idx_B = torch.randint(0, len(self.labels), (config.batch_size,), device=self.device)
        x = self.images_NCHW[idx_B].float().div_(255.0)
        if rot or shift:
            x = _torch_augment(x, rot, shift)  # black is 0 before normalizing, as ours after
        x = x.sub_(augment.MNIST_MEAN).div_(augment.MNIST_STD)
        logits = self.net(x)
        loss = F.cross_entropy(logits, self.labels[idx_B], label_smoothing=config.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def run(self, steps: int) -> float:
        """Seconds for `steps` training steps, the device's work included."""
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        t = time.perf_counter()
        loss = None
        for _ in range(steps):
            loss = self._step()
        loss = float(loss.detach()) if loss is not None else 0.0  # waits for the device
        seconds = time.perf_counter() - t
        if not math.isfinite(loss):
            raise FloatingPointError(f"torch training diverged while benchmarking: loss {loss}")
        return seconds
