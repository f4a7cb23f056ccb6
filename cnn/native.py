"""Native kernels for few channels, run by XLA as FFI calls on the CPU.

`conv(x_BHWC, w_HWIO, pads, b_O=None, relu=False, stats=False)` is a stride-1, undilated,
ungrouped float32 convolution with a custom VJP whose gradients are native too: the input
gradient is the same kernel run on the output gradient with the flipped kernel, the kernel and
bias gradients one more loop. As each output is written it adds the bias, applies the relu and,
with stats, adds the output and its square to each image's per-channel sums (a batch norm's
statistics); the relu's derivative (0 where the output is 0) is applied as the output gradient
is read. So the relu and the batch norm's statistics take no pass over memory of their own.

`bn_max_pool`, `bn_max_pool_sums` and `bn_max_pool_grad` are training's batch norm followed by a max
pool over non-overlapping windows (`layers.batch_norm_max_pool`): one pass normalizes and pools,
keeping the input at each maximum, so that batch norm's sums in the backward pass read only
pooled-size arrays. `conv_pool_grads` takes the gradients of a relu'd conv under them in one call,
without `bn_max_pool_grad`'s full-size gradient ever being written: it is made image by image where
the conv's input- and kernel-gradient kernels read it (`layers.conv2d_batch_norm_max_pool`).
`conv_pw` is a relu'd conv followed by a relu'd 1x1 conv, one call each way
(`layers.conv2d_relu_conv1x1`): the 1x1 reads the conv's output in cache, and the gradient in it is
never written.

`affine_warp` rotates and shifts images with bilinear sampling (`cnn.augment.affine_warp`).

`dense(x_BK, w_KO)` is a kernel that covers its whole input as a matmul with few outputs (O <=
32), forward and gradients; `adam_moments` is Adam's moment update for one array
(`cnn.optim`).

The library is compiled from `native/conv.cc` by the machine's C++ compiler on first use (`-O3
-march=native`, 20-50 s on 2 cores) and cached in `$CNN_CACHE_DIR/native`, keyed by the source, the
compiler, the flags and the CPU. `unavailable_reason()` says why it cannot be used, if so
(no compiler, a failed build, another backend, or `CNN_NATIVE=0` in the environment).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from cnn.files import cache_dir

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

MAX_CHANNELS = 32  # input and output channels; 4 vectors of 8 lanes
SOURCE = pathlib.Path(__file__).with_name("native") / "conv.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {
    "cnn_conv": "CnnConv",
    "cnn_conv_dw": "CnnConvDw",
    "cnn_bn_pool": "CnnBnPool",
    "cnn_bn_pool_sums": "CnnBnPoolSums",
    "cnn_bn_pool_grad": "CnnBnPoolGrad",
    "cnn_conv_pool_grads": "CnnConvPoolGrads",
    "cnn_conv_pw": "CnnConvPw",
    "cnn_conv_pw_grads": "CnnConvPwGrads",
    "cnn_adam": "CnnAdam",
    "cnn_dense": "CnnDense",
    "cnn_dense_dx": "CnnDenseDx",
    "cnn_dense_dw": "CnnDenseDw",
    "cnn_warp": "CnnWarp",
}
_BUILD_TIMEOUT_S = 300


class NativeError(RuntimeError):
    """The native kernel cannot run here; the message says why and what to do."""


def compiler() -> str | None:
    """The C++ compiler: env CXX, else g++, c++ or clang++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    return next((p for p in map(shutil.which, ("g++", "c++", "clang++")) if p), None)


def _cpu_identity() -> str:
    """What -march=native depends on: the first CPU's vendor, family, model and flags."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = ("vendor_id", "cpu family", "model", "flags", "Features", "CPU part")
    first = text.split("\n\n", 1)[0]
    return "\n".join(ln for ln in first.splitlines() if ln.split(":")[0].strip() in keep)


def library_path(cxx: str) -> pathlib.Path:
    """Where the library built by `cxx` for this CPU lives."""
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        version.encode(),
        " ".join(FLAGS).encode(),
        _cpu_identity().encode(),
        jax.ffi.include_dir().encode(),
    ):
        h.update(hashlib.sha256(part).digest())
    return cache_dir() / "native" / f"libcnn_conv-{h.hexdigest()[:16]}.so"


def build(cxx: str, path: pathlib.Path) -> None:
    """Compiles SOURCE into path (a temp file, then a rename); NativeError on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise NativeError(
                f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@functools.cache
def _load() -> str | None:
    """Builds (once per cache), loads and registers the library; the reason if it cannot."""
    if os.environ.get("CNN_NATIVE", "1") == "0":
        return "disabled by CNN_NATIVE=0 in the environment"
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler found (install g++, or set CXX to one)"
    try:
        path = library_path(cxx)
        if not path.exists():
            build(cxx, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in _TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (OSError, subprocess.SubprocessError, NativeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason() -> str | None:
    """None when the native kernel can run on the default backend, else why not."""
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU only, and the default backend is {jax.default_backend()}"
    return _load()


def available() -> bool:
    return unavailable_reason() is None


def require() -> None:
    """Raises NativeError naming the cause when the native kernel cannot run."""
    reason = unavailable_reason()
    if reason is not None:
        raise NativeError(f"the native convolution is unavailable: {reason}. Use impl='auto'.")


def supports(
    kernel, c_in: int, c_out: int, stride, dilation, groups: int, pads: Pads, dtype
) -> bool:
    """Whether `conv` computes this convolution (it says nothing of speed)."""
    return (
        tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and groups == 1
        and 1 <= c_in <= MAX_CHANNELS
        and 1 <= c_out <= MAX_CHANNELS
        and jnp.dtype(dtype) == jnp.float32
        and all(0 <= p <= k - 1 for k, side in zip(kernel, pads, strict=True) for p in side)
    )


def supports_bn_max_pool(shape_BHWC, win, dtype) -> bool:
    """Whether `bn_max_pool` and its gradients take this input and window."""
    _, h, w, c = shape_BHWC
    return (
        jnp.dtype(dtype) == jnp.float32
        and c in (8, 16, 24, 32)  # whole 8-lane vectors
        and win[0] * win[1] <= 255  # places fit in uint8
        and h >= win[0]
        and w >= win[1]
    )


def _pad_attrs(pads: Pads) -> dict[str, np.int64]:
    (pt, pb), (pl, pr) = pads
    return {
        "pad_top": np.int64(pt),
        "pad_bottom": np.int64(pb),
        "pad_left": np.int64(pl),
        "pad_right": np.int64(pr),
    }


def _f32(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def _out_hw(x_BHWC: Array, w_HWIO: Array, pads: Pads) -> tuple[int, int]:
    """A stride-1 conv's output height and width."""
    (pt, pb), (pl, pr) = pads
    return (
        x_BHWC.shape[1] + pt + pb - w_HWIO.shape[0] + 1,
        x_BHWC.shape[2] + pl + pr - w_HWIO.shape[1] + 1,
    )


def _forward(
    x_BHWC: Array,
    w_HWIO: Array,
    b_O: Array,
    pads: Pads,
    relu: bool,
    mask_BHWC: Array | None,
    stats: bool = False,
    terms_B2C: Array | None = None,
) -> tuple[Array, Array]:
    """(act(conv(x' , w) + b), its per-image sums (B, 2, O) if stats else a (0,) placeholder),
    x' = x (+ terms[:, 0] + 2 mask * terms[:, 1]) where mask > 0, else 0; the mask source None
    means no mask (and no terms)."""
    b, o = x_BHWC.shape[0], w_HWIO.shape[3]
    out = (
        _f32((b, *_out_hw(x_BHWC, w_HWIO, pads), o)),
        _f32((b, 2, o) if stats else (0,)),
    )
    m = x_BHWC if mask_BHWC is None else mask_BHWC  # unread without the mask
    t = b_O if terms_B2C is None else terms_B2C  # unread without terms
    return jax.ffi.ffi_call("cnn_conv", out, vmap_method="sequential")(
        x_BHWC,
        w_HWIO,
        b_O,
        m,
        t,
        **_pad_attrs(pads),
        relu=relu,
        mask=mask_BHWC is not None,
        stats=stats,
        terms=terms_B2C is not None,
    )


def conv(
    x_BHWC: Array,
    w_HWIO: Array,
    pads: Pads,
    b_O: Array | None = None,
    relu: bool = False,
    stats: bool = False,
):
    """Stride-1 float32 convolution, pads ((top, bottom), (left, right)), each at most k - 1;
    plus the bias b_O, then relu if asked. stats=True returns (y, sums_B2O): each image's sum
    of y and of y * y per channel, taken as y is written (batch norm's statistics).
    3x3 kernels with an even output and 4-16 channels each way run as Winograd F(2x2, 3x3),
    and so do their kernel gradients with 8 or 16 channels in: equal to lax within float32
    rounding (tests/test_native.py), not bit for bit; an inf in x can come out as NaN (inf -
    inf in a transform)."""
    require()
    y_BHWO, sums_B2O = _conv(x_BHWC, w_HWIO, b_O, pads, relu, stats)
    return (y_BHWO, sums_B2O) if stats else y_BHWO


def _conv_impl(x_BHWC, w_HWIO, b_O, pads, relu, stats):
    bias_O = jnp.zeros(w_HWIO.shape[3], jnp.float32) if b_O is None else b_O
    return _forward(x_BHWC, w_HWIO, bias_O, pads, relu, None, stats)


_conv = jax.custom_vjp(_conv_impl, nondiff_argnums=(3, 4, 5))


def _value(primal):
    return primal.value if isinstance(primal, CustomVJPPrimal) else primal


def _conv_fwd(x_BHWC, w_HWIO, b_O, pads, relu, stats):
    x_BHWC, w_HWIO, b_O = _value(x_BHWC), _value(w_HWIO), _value(b_O)
    outs = _conv_impl(x_BHWC, w_HWIO, b_O, pads, relu, stats)
    y_BHWO = outs[0] if relu or stats else None
    return outs, (x_BHWC, w_HWIO, b_O, y_BHWO)


def _conv_bwd(pads, relu, stats, res, cotangents):
    x_BHWC, w_HWIO, b_O, y_BHWO = res
    g_BHWO, g_sums_B2O = cotangents
    kh, kw, c, o = w_HWIO.shape
    if isinstance(g_BHWO, SymbolicZero):  # only the sums are used, so stats kept y
        g_BHWO = jnp.zeros_like(y_BHWO)
    terms_B2O = None  # d sum(y) = 1, d sum(y^2) = 2y: with a relu, the kernels add these
    if stats and not isinstance(g_sums_B2O, SymbolicZero):  # as they read g (no pass of its own)
        if relu:
            terms_B2O = g_sums_B2O
        else:
            g_BHWO = (
                g_BHWO
                + g_sums_B2O[:, None, None, 0, :]
                + 2 * y_BHWO * g_sums_B2O[:, None, None, 1, :]
            )
    a_BHWO = y_BHWO if relu else None  # the relu's output, whose > 0 is its derivative
    full = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]), (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
    dx_BHWC, _ = _forward(
        g_BHWO, _flip(w_HWIO), jnp.zeros(c, jnp.float32), full, False, a_BHWO, terms_B2C=terms_B2O
    )
    m = g_BHWO if a_BHWO is None else a_BHWO
    # the kernel sums the bias gradient from the masked g it reads; without a relu, XLA's sum,
    # as autodiff of "+ b" takes it, keeps the bits of conv + b
    native_db = b_O is not None and a_BHWO is not None
    attrs = {
        **_pad_attrs(pads),
        "mask": a_BHWO is not None,
        "bias": native_db,
        "terms": terms_B2O is not None,
    }
    swap = _swap_dw((kh, kw), pads, c, o)  # the same sums, with the lanes on the wider side
    a, b, dw_shape = (g_BHWO, x_BHWC, (1, 1, o, c)) if swap else (x_BHWC, g_BHWO, w_HWIO.shape)
    dw, db_O = jax.ffi.ffi_call(
        "cnn_conv_dw",
        (_f32(dw_shape), _f32((o,))),
        vmap_method="sequential",
    )(a, b, m, g_BHWO if terms_B2O is None else terms_B2O, **attrs, swap=swap)
    dw_HWIO = dw.transpose(0, 1, 3, 2) if swap else dw
    if b_O is None:
        return dx_BHWC, dw_HWIO, None
    return dx_BHWC, dw_HWIO, db_O if native_db else jnp.sum(g_BHWO, axis=(0, 1, 2))


_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


def _flip(w_HWIO: Array) -> Array:
    """The kernel whose convolution of a conv's output gradient (fully padded) is its input
    gradient: flipped in space, in and out swapped (HWOI)."""
    return jnp.flip(w_HWIO, (0, 1)).transpose(0, 1, 3, 2)


def _swap_dw(kernel, pads: Pads, c: int, o: int) -> bool:
    """Whether a 1x1 kernel gradient is cheaper with x and g swapped: the kernel's work goes as
    (channels held in 8-lane vectors, rounded up) x (the other side's channels)."""
    lanes = lambda n: -(-n // 8) * 8  # noqa: E731
    return tuple(kernel) == (1, 1) and pads == ((0, 0), (0, 0)) and lanes(c) * o < lanes(o) * c


# ----------------------------------------------------------------- batch norm, then max pool
def _window(win) -> dict[str, np.int64]:
    return {"kh": np.int64(win[0]), "kw": np.int64(win[1])}


def _pooled_shape(x_BHWC: Array, win) -> tuple[int, ...]:
    b, h, w, c = x_BHWC.shape
    return (b, h // win[0], w // win[1], c)


def bn_max_pool(x_BHWC: Array, inv_C: Array, shift_C: Array, win) -> tuple[Array, Array, Array]:
    """Max over non-overlapping windows of x * inv + shift: (pooled, place of each maximum in
    its window, row-major, uint8, the first of ties; x at that place)."""
    require()
    shape = _pooled_shape(x_BHWC, win)
    out = (_f32(shape), jax.ShapeDtypeStruct(shape, jnp.uint8), _f32(shape))
    return jax.ffi.ffi_call("cnn_bn_pool", out, vmap_method="sequential")(
        x_BHWC, inv_C, shift_C, **_window(win)
    )


def bn_max_pool_sums(g_BPQC: Array, x_at_BPQC: Array, mean_C: Array) -> Array:
    """Per image and channel (B, 2, C): sum g, and sum g * (x_at - mean), from the pooled
    gradient g and x at each maximum's place (`bn_max_pool`'s third output)."""
    require()
    b, c = g_BPQC.shape[0], g_BPQC.shape[3]
    out = _f32((b, 2, c))
    return jax.ffi.ffi_call("cnn_bn_pool_sums", out, vmap_method="sequential")(
        g_BPQC, x_at_BPQC, mean_C
    )


def conv_pool_grads(
    x_BHWC, w_HWIO, b_O, pads, a_BHWO, g_BPQO, at_BPQO, inv_O, c1_O, c2_O, w_B, win
):
    """(dx, dw, db; db None without b) of a = relu(conv(x, w, pads) + b) whose output gradient
    is bn_max_pool_grad(g, at, a, inv, c1, c2, w_B, win): the same values, but one call makes
    that gradient image by image, from the pooled g (B, P, Q, O), where the input and kernel
    gradients both read it, instead of it being written and read back (O: 8, 16, 24 or 32)."""
    require()
    out = (
        _f32(x_BHWC.shape),
        _f32(w_HWIO.shape),
        _f32(w_HWIO.shape[3:]),
    )
    dx, dw, db = jax.ffi.ffi_call("cnn_conv_pool_grads", out, vmap_method="sequential")(
        x_BHWC,
        _flip(w_HWIO),
        a_BHWO,
        g_BPQO,
        at_BPQO,
        inv_O,
        c1_O,
        c2_O,
        w_B,
        **_pad_attrs(pads),
        **_window(win),
        bias=b_O is not None,
    )
    return dx, dw, None if b_O is None else db


def bn_max_pool_grad(g_BHWC, at_BHWC, x_BHWC, inv_C, c1_C, c2_C, w_B, win) -> Array:
    """(c1 + x * c2) * w[b] + gz * inv everywhere in x, gz the pooled gradient at each
    maximum's place and 0 elsewhere: batch norm's input gradient under a max pool."""
    require()
    out = _f32(x_BHWC.shape)
    return jax.ffi.ffi_call("cnn_bn_pool_grad", out, vmap_method="sequential")(
        g_BHWC, at_BHWC, x_BHWC, inv_C, c1_C, c2_C, w_B, **_window(win)
    )


# ------------------------------------------------------- a conv and relu, then a 1x1 and relu
def supports_conv_pw(c_in: int, c_mid: int, c_out: int, dtype) -> bool:
    """Whether `conv_pw` takes these channels: at most 32 in and out, 8, 16, 24 or 32 between."""
    return (
        1 <= c_in <= MAX_CHANNELS
        and 1 <= c_out <= MAX_CHANNELS
        and c_mid in (8, 16, 24, 32)
        and jnp.dtype(dtype) == jnp.float32
    )


def conv_pw(x_BHWC, w_HWIM, b_M, w_11MN, b_N, pads: Pads) -> Array:
    """relu(conv(a, w_11MN) + b_N), a = relu(conv(x, w, pads) + b_M) with M channels
    (`supports_conv_pw`): one call makes each image's a and, while it is in cache, the 1x1
    conv of it; the backward pass makes the gradient in a image by image where the kernel
    gradients (or x's, in a call of its own that XLA drops when x needs none) read it, never
    written. The same values as `conv` taking the two layers one after another. A bias None:
    none."""
    require()
    b_M = jnp.zeros(w_HWIM.shape[3], jnp.float32) if b_M is None else b_M
    b_N = jnp.zeros(w_11MN.shape[3], jnp.float32) if b_N is None else b_N
    return _conv_pw(x_BHWC, w_HWIM, b_M, w_11MN, b_N, pads)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _conv_pw(x_BHWC, w_HWIM, b_M, w_11MN, b_N, pads):
    """(y, a)."""
    b, hw = x_BHWC.shape[0], _out_hw(x_BHWC, w_HWIM, pads)
    out = (_f32((b, *hw, w_11MN.shape[3])), _f32((b, *hw, w_HWIM.shape[3])))
    return jax.ffi.ffi_call("cnn_conv_pw", out, vmap_method="sequential")(
        x_BHWC, w_HWIM, b_M, w_11MN, b_N, **_pad_attrs(pads)
    )


def _conv_pw_fwd(x_BHWC, w_HWIM, b_M, w_11MN, b_N, pads):
    y_BHWN, a_BHWM = _conv_pw(x_BHWC, w_HWIM, b_M, w_11MN, b_N, pads)
    return (y_BHWN, a_BHWM), (x_BHWC, w_HWIM, w_11MN, y_BHWN, a_BHWM)


def _conv_pw_bwd(pads, res, cotangents):
    x_BHWC, w_HWIM, w_11MN, y_BHWN, a_BHWM = res
    g_BHWN = cotangents[0]  # a is an output for this backward pass only: its cotangent is 0
    m, n = w_11MN.shape[2:]
    swap = _swap_dw((1, 1), ((0, 0), (0, 0)), m, n)  # M % 8 == 0: exactly when N % 8 != 0
    args = (x_BHWC, _flip(w_HWIM), _flip(w_11MN), y_BHWN, a_BHWM, g_BHWN)
    call = functools.partial(jax.ffi.ffi_call, "cnn_conv_pw_grads", vmap_method="sequential")
    attrs = {**_pad_attrs(pads), "swap": swap}
    none = _f32((0,))
    dx = call((_f32(x_BHWC.shape), none, none, none, none))(*args, **attrs, input_grad=True)[0]
    dw2_shape = (1, 1, n, m) if swap else (1, 1, m, n)
    out = (none, _f32(w_HWIM.shape), _f32((m,)), _f32(dw2_shape), _f32((n,)))
    _, dw, db, dw2, db2 = call(out)(*args, **attrs, input_grad=False)
    return dx, dw, db, dw2.transpose(0, 1, 3, 2) if swap else dw2, db2


_conv_pw.defvjp(_conv_pw_fwd, _conv_pw_bwd)


# ------------------------------------------------------------------------------------ dense
def supports_dense(kernel, in_hw, c_out: int, dilation, groups: int, pads: Pads, dtype) -> bool:
    """Whether `dense` computes this convolution: its kernel covers the unpadded input."""
    return (
        tuple(kernel) == tuple(in_hw)
        and tuple(dilation) == (1, 1)
        and groups == 1
        and 1 <= c_out <= MAX_CHANNELS
        and jnp.dtype(dtype) == jnp.float32
        and pads == ((0, 0), (0, 0))
    )


def dense(x_BK: Array, w_KO: Array) -> Array:
    """x @ w for float32 x (B, K) and w (K, O <= 32), and its gradients, as native passes."""
    require()
    return _dense(x_BK, w_KO)


def _dense_call(target: str, a, b, shape) -> Array:
    out = _f32(shape)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(a, b)


@jax.custom_vjp
def _dense(x_BK, w_KO):
    return _dense_call("cnn_dense", x_BK, w_KO, (x_BK.shape[0], w_KO.shape[1]))


def _dense_fwd(x_BK, w_KO):
    return _dense(x_BK, w_KO), (x_BK, w_KO)


def _dense_bwd(res, g_BO):
    x_BK, w_KO = res
    return (
        _dense_call("cnn_dense_dx", g_BO, w_KO, x_BK.shape),
        _dense_call("cnn_dense_dw", x_BK, g_BO, w_KO.shape),
    )


_dense.defvjp(_dense_fwd, _dense_bwd)


# ------------------------------------------------------------------------------------- Adam
def adam_moments(g, mu, nu, bc_2, *, b1: float, b2: float, eps: float):
    """optax.scale_by_adam's (update, mu, nu) for one float32 array and eps_root=0, in one pass;
    bc_2 = (1 - b1**count, 1 - b2**count) as optax has them. mu and nu are updated in place
    where XLA can donate them."""
    require()
    out = tuple(_f32(g.shape) for _ in range(3))
    return jax.ffi.ffi_call(
        "cnn_adam", out, vmap_method="sequential", input_output_aliases={1: 1, 2: 2}
    )(
        g,
        mu,
        nu,
        bc_2,
        b1=np.float32(b1),
        b2=np.float32(b2),
        c1=np.float32(1 - b1),
        c2=np.float32(1 - b2),
        eps=np.float32(eps),
    )


# ------------------------------------------------------------------------------------- warp
def affine_warp(
    x_BHWC: Array, cos_B: Array, sin_B: Array, shift_B2: Array, fill: Array, window: int
) -> Array:
    """`cnn.augment.affine_warp`'s bilinear rotation and shift of float32 images, forward only.

    The arithmetic of XLA's sum over shifted copies at offsets -window..window
    (`augment._bilinear_window_BHWC`) without its terms of weight 0, rounded as XLA's CPU
    compiler was measured to round it for one channel at 28x28 (within 1e-5 of it elsewhere;
    window 0: as for a window that starts beyond every sample); cos_B and sin_B are the angles'
    as the caller computes them.
    """
    require()
    b = x_BHWC.shape[0]
    if x_BHWC.ndim != 4 or x_BHWC.dtype != jnp.float32:
        raise ValueError(
            f"affine_warp: expects float32 (B, H, W, C), got {x_BHWC.dtype}{x_BHWC.shape}"
        )
    if cos_B.shape != (b,) or sin_B.shape != (b,) or shift_B2.shape != (b, 2):
        raise ValueError(
            f"affine_warp: expects cos and sin ({b},) and shift ({b}, 2), got "
            f"{cos_B.shape}, {sin_B.shape}, {shift_B2.shape}"
        )
    if window < 0:
        raise ValueError(f"affine_warp: window must be >= 0, got {window}")
    cs_B2 = jnp.stack([cos_B, sin_B], axis=1).astype(jnp.float32)
    fill_1 = jnp.reshape(jnp.asarray(fill, jnp.float32), (1,))
    return jax.ffi.ffi_call("cnn_warp", _f32(x_BHWC.shape), vmap_method="sequential")(
        x_BHWC, cs_B2, shift_B2.astype(jnp.float32), fill_1, window=np.int64(window)
    )
