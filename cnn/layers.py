"""Pure layers: functions of arrays (NHWC activations, HWIO kernels), no hidden state.

Every layer checks its shapes with chex at trace time, and has an analytic shape function
(`conv2d_shape`, `pool_shape`) that tests hold against what the layer returns.

`conv2d` owns several exact lowerings of the same convolution (see `CONV_IMPLS`); "auto" picks one
by geometry and backend, and a layer may name another. Tests prove each equal to
`lax.conv_general_dilated`, values and gradients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn import activations, native
from cnn.geometry import PaddingLike, Pads, effective_kernel, output_hw, pair, resolve_padding

Array = jax.Array
Shape = tuple[int, ...]

CONV_IMPLS = ("auto", "xla", "dense", "pointwise", "im2col", "direct", "native")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------- shape inference
def conv2d_shape(
    x_shape: Shape,
    w_shape: Shape,
    *,
    stride: int | Sequence[int] = 1,
    padding: PaddingLike = "VALID",
    dilation: int | Sequence[int] = 1,
) -> Shape:
    """Output shape of `conv2d` for these input and kernel shapes."""
    b, h, w, _ = x_shape
    kh, kw, _, o = w_shape
    pads = resolve_padding(
        padding, (h, w), (kh, kw), pair(stride, "stride"), pair(dilation, "dilation")
    )
    ho, wo = output_hw((h, w), (kh, kw), pair(stride, "stride"), pads, pair(dilation, "dilation"))
    return (b, ho, wo, o)


def pool_shape(
    x_shape: Shape,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
) -> Shape:
    """Output shape of `max_pool` / `avg_pool`."""
    b, h, w, c = x_shape
    win = pair(window, "window")
    st = win if stride is None else pair(stride, "stride")
    pads = resolve_padding(padding, (h, w), win, st)
    ho, wo = output_hw((h, w), win, st, pads)
    return (b, ho, wo, c)


# ----------------------------------------------------------------------------- checks
def _check_fits(layer: str, x: Array, k_eff: tuple[int, int], pads: Pads, what: str) -> None:
    for axis, k, (lo, hi) in ((1, k_eff[0], pads[0]), (2, k_eff[1], pads[1])):
        chex.assert_axis_dimension_gteq(
            x,
            axis,
            k - lo - hi,
            custom_message=(
                f"{layer}: {what} of extent {k_eff} is larger than the padded input: input shape"
                f" {tuple(x.shape)}, padding {pads}. Use a smaller kernel, more padding or a"
                " larger input"
            ),
        )


def _conv_plan(x_BHWC, w_HWIO, b_O, stride, padding, dilation, groups, impl):
    """conv2d's checks and choice of lowering: (impl, stride, dilation, pads, out_hw, dense),
    dense when impl "native" runs `native.dense`. Raises naming the limits of a named impl."""
    st, dil = pair(stride, "stride"), pair(dilation, "dilation")
    kernel = (int(w_HWIO.shape[0]), int(w_HWIO.shape[1])) if w_HWIO.ndim == 4 else (1, 1)
    in_hw = (int(x_BHWC.shape[1]), int(x_BHWC.shape[2])) if x_BHWC.ndim == 4 else (0, 0)
    pads = resolve_padding(padding, in_hw, kernel, st, dil)
    _check_conv(x_BHWC, w_HWIO, b_O, groups, effective_kernel(kernel, dil), pads)
    out_hw = output_hw(in_hw, kernel, st, pads, dil)
    c_io = (int(x_BHWC.shape[3]), int(w_HWIO.shape[3]))
    if impl == "auto":
        impl = choose_conv_impl(
            in_hw, kernel, st, pads, dil, out_hw, channels=c_io, groups=groups, dtype=x_BHWC.dtype
        )
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv2d: unknown impl {impl!r}; valid: {', '.join(CONV_IMPLS)}")
    if impl == "pointwise" and kernel != (1, 1):
        raise ValueError(f"conv2d: impl='pointwise' needs a 1x1 kernel, got {kernel}")
    if impl == "direct" and (st != (1, 1) or groups != 1):
        raise ValueError(
            f"conv2d: impl='direct' needs stride 1 and groups=1, got stride {st}, groups={groups}"
        )
    if impl == "dense" and out_hw != (1, 1):
        raise ValueError(
            f"conv2d: impl='dense' needs a kernel that covers the padded input (1x1 output),"
            f" got output {out_hw}"
        )
    dense = impl == "native" and native.supports_dense(
        kernel, in_hw, c_io[1], dil, groups, pads, x_BHWC.dtype
    )
    if (
        impl == "native"
        and not dense
        and not native.supports(kernel, *c_io, st, dil, groups, pads, x_BHWC.dtype)
    ):
        raise ValueError(
            f"conv2d: impl='native' needs float32, stride 1, no dilation, groups=1, at most"
            f" {native.MAX_CHANNELS} channels in and out and padding of at most k - 1 (or a"
            f" kernel that covers the unpadded input, with at most {native.MAX_CHANNELS} out);"
            f" got {x_BHWC.dtype}, stride {st}, dilation {dil}, groups={groups}, channels"
            f" {c_io}, padding {pads}, kernel {kernel}"
        )
    return impl, st, dil, pads, out_hw, dense


def _check_conv(x: Array, w: Array, b: Array | None, groups: int, k_eff, pads: Pads) -> None:
    chex.assert_rank(
        x, 4, custom_message=f"conv2d: input x must be NHWC (rank 4), got shape {tuple(x.shape)}"
    )
    chex.assert_rank(
        w, 4, custom_message=f"conv2d: kernel w must be HWIO (rank 4), got shape {tuple(w.shape)}"
    )
    c_in, c_out = x.shape[3], w.shape[3]
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d: groups must be a positive int, got {groups!r}")
    chex.assert_equal(
        (c_in % groups, c_out % groups),
        (0, 0),
        custom_message=(
            f"conv2d: groups={groups} must divide the input channels ({c_in}) and the output"
            f" channels ({c_out}); x {tuple(x.shape)}, w {tuple(w.shape)}"
        ),
    )
    chex.assert_axis_dimension(
        x,
        3,
        w.shape[2] * groups,
        custom_message=(
            f"conv2d: input channels of x {tuple(x.shape)} must equal the kernel's input channels"
            f" x groups = {w.shape[2]} x {groups} (w {tuple(w.shape)})"
        ),
    )
    if b is not None:
        chex.assert_shape(
            b,
            (c_out,),
            custom_message=f"conv2d: bias must have shape ({c_out},), got {tuple(b.shape)}",
        )
    _check_fits("conv2d", x, k_eff, pads, "the dilated kernel")


# ----------------------------------------------------------------------------- convolution
def conv2d(
    x_BHWC: Array,
    w_HWIO: Array,
    b_O: Array | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: PaddingLike = "VALID",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    impl: str = "auto",
    activation: str | None = None,
    stats: bool = False,
):
    """2-D convolution (cross-correlation, as in every framework) of NHWC x with HWIO w.

    padding: "VALID", "SAME", an int, (pad_h, pad_w) or ((top, bottom), (left, right)).
    activation: None, or a name from `cnn.activations` applied to conv + bias (as Keras's
    Conv2D(activation=...)); "native" applies "relu" as it writes each output, and its derivative
    as it reads the output gradient.
    stats=True returns (y, sums_B2O): per image and channel, the sum of y and of y * y, which
    "native" takes as it writes y (batch norm's statistics, `batch_norm(sums_B2C=...)`); None
    from the other lowerings.
    impl: "auto", or one lowering from CONV_IMPLS; all give the same result. "direct" needs
    stride 1 and groups 1, and is reverse-mode only (its custom VJP: no jax.jvp / jacfwd).
    "native" (`cnn.native`, CPU) also needs float32, at most 32 channels in and out, no
    dilation and padding of at most k - 1, or a kernel that covers the unpadded input (then
    any channels in, at most 32 out: `native.dense`); it is reverse-mode only too. Its 3x3
    kernels with an even output and 4-16 channels run Winograd F(2x2, 3x3), and their kernel
    gradients too with 8 or 16 channels in: equal up to float32 rounding (an inf in x can
    come out as NaN, from inf - inf in a transform).
    """
    impl, st, dil, pads, out_hw, dense = _conv_plan(
        x_BHWC, w_HWIO, b_O, stride, padding, dilation, groups, impl
    )
    act = None if activation is None else activations.get(activation)
    if impl == "native" and not dense and (act is None or activation == "relu"):
        return native.conv(x_BHWC, w_HWIO, pads, b_O, relu=act is not None, stats=stats)
    if impl == "native" and not dense:
        y_BHWO = native.conv(x_BHWC, w_HWIO, pads, b_O)
    else:
        lowering = _native_dense if dense else _LOWERINGS[impl]
        y_BHWO = lowering(x_BHWC, w_HWIO, st, pads, dil, groups, out_hw)
        if b_O is not None:
            y_BHWO = y_BHWO + b_O.reshape(1, 1, 1, -1)
    y_BHWO = y_BHWO if act is None else act(y_BHWO)
    return (y_BHWO, None) if stats else y_BHWO


# On the CPU, "auto" gives every convolution the native kernel supports to it (`cnn.native`:
# 1.5-2.7x faster than the best of the lowerings below on the configs' layers, BENCHMARKS.md).
# Otherwise: measured on the 2-core development CPU (BENCHMARKS.md), XLA's CPU convolution backward
# pass is 2-4x slower than im2col + matmul for small channel counts, and ~300x slower when the
# kernel covers the input. For 3x3 kernels, autodiff's transposed dimension labels are the cause:
# inside the training scan XLA runs those convolutions as a generic loop nest (tiny's 24x24 layer:
# 79 ms against 4.4 ms). impl="direct" avoids them and wins on layers with large im2col patches
# (tiny's 24x24 one), but lost to im2col in the other nets, so "auto" does not pick it: a model
# names it. Past a few dozen taps, im2col's compile time grows faster than its gain.
_IM2COL_MAX_TAPS = 49


def choose_conv_impl(
    in_hw,
    kernel,
    stride,
    pads,
    dilation,
    out_hw,
    backend=None,
    *,
    channels: tuple[int, int] | None = None,
    groups: int = 1,
    dtype=jnp.float32,
) -> str:
    """The fastest exact lowering for this geometry on `backend` (default: JAX's default).

    Full-cover and 1x1 kernels are matmuls on every backend. On the CPU, the native kernels
    take what they support (`channels`, in and out, must be given) when they can be built (a
    full-cover kernel with few outputs: `native.dense`, 2-3x XLA's matmul at 10 outputs), and
    im2col works around XLA's CPU convolution otherwise; GPUs (cuDNN) and TPUs keep XLA's own
    (untested on accelerators). The backend is read when tracing: code placed on another device
    can pass conv2d(impl=...) instead.
    """
    on_cpu = (backend or jax.default_backend()) == "cpu"
    if out_hw == (1, 1):
        if (
            on_cpu
            and channels is not None
            and native.supports_dense(kernel, in_hw, channels[1], dilation, groups, pads, dtype)
            and native.available()
        ):
            return "native"
        return "dense"
    few_taps = kernel[0] * kernel[1] <= _IM2COL_MAX_TAPS
    if (
        on_cpu
        and channels is not None
        and few_taps
        and native.supports(kernel, *channels, stride, dilation, groups, pads, dtype)
        and native.available()
    ):
        return "native"
    if kernel == (1, 1):
        return "pointwise"
    if on_cpu and few_taps:
        return "im2col"
    return "xla"


def _pad(x_BHWC: Array, pads: Pads) -> Array:
    if pads == ((0, 0), (0, 0)):
        return x_BHWC
    return jnp.pad(x_BHWC, ((0, 0), pads[0], pads[1], (0, 0)))


def _tap(x_BHWC: Array, i: int, j: int, stride, dilation, out_hw) -> Array:
    """The input pixels that kernel tap (i, j) multiplies, for every output position."""
    (sh, sw), (dh, dw), (ho, wo) = stride, dilation, out_hw
    return lax.slice(
        x_BHWC,
        (0, i * dh, j * dw, 0),
        (x_BHWC.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, x_BHWC.shape[3]),
        (1, sh, sw, 1),
    )


def _grouped_contract(patches: Array, w_TCO: Array, groups: int) -> Array:
    """patches (..., T, C) x w (T, C/groups, O) -> (..., O), block-diagonal over groups."""
    *lead, t, c = patches.shape
    o = w_TCO.shape[-1]
    if groups == 1:
        out = jnp.dot(patches.reshape(-1, t * c), w_TCO.reshape(t * c, o))
        return out.reshape(*lead, o)
    cg, og = c // groups, o // groups
    p = patches.reshape(-1, t, groups, cg)
    wg = w_TCO.reshape(t, cg, groups, og)
    out = jnp.einsum("ntgc,tcgo->ngo", p, wg)
    return out.reshape(*lead, o)


def _conv_xla(x, w, stride, pads, dilation, groups, out_hw):
    del out_hw
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=stride,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


def _conv_dense(x, w, stride, pads, dilation, groups, out_hw):
    """Kernel covers the padded input (one output position): a matmul."""
    kh, kw, cg, o = w.shape
    x_win = _tap(_pad(x, pads), 0, 0, dilation, (1, 1), (kh, kw))  # taps of the single window
    y = _grouped_contract(
        x_win.reshape(x.shape[0], kh * kw, x.shape[3]), w.reshape(kh * kw, cg, o), groups
    )
    return y.reshape(x.shape[0], 1, 1, o)


def _conv_pointwise(x, w, stride, pads, dilation, groups, out_hw):
    """1x1 kernel: a matmul over channels at every (strided) position."""
    x_sel = _tap(_pad(x, pads), 0, 0, stride, dilation, out_hw)
    _, _, cg, o = w.shape
    return _grouped_contract(x_sel[..., None, :], w.reshape(1, cg, o), groups)


def _conv_im2col(x, w, stride, pads, dilation, groups, out_hw):
    """Patches (B, Ho, Wo, kh*kw, C), then one matmul.

    The patches are built in two passes, kw column taps and then kh row taps of those: XLA on CPU
    copies kw + kh slices instead of kh*kw, and the backward pass scatters in two passes too.
    """
    kh, kw, cg, o = w.shape
    xp = _pad(x, pads)
    (sh, sw), (dh, dw), (ho, wo) = stride, dilation, out_hw
    cols_BHWJC = jnp.stack(
        [lax.slice_in_dim(xp, j * dw, j * dw + (wo - 1) * sw + 1, sw, axis=2) for j in range(kw)],
        axis=3,
    )
    patches_BHWIJC = jnp.stack(
        [
            lax.slice_in_dim(cols_BHWJC, i * dh, i * dh + (ho - 1) * sh + 1, sh, axis=1)
            for i in range(kh)
        ],
        axis=3,
    )
    patches = patches_BHWIJC.reshape(*patches_BHWIJC.shape[:3], kh * kw, x.shape[3])
    return _grouped_contract(patches, w.reshape(kh * kw, cg, o), groups)


def _canonical_conv(lhs, rhs, pads: Pads, window_strides=(1, 1), rhs_dilation=(1, 1)) -> Array:
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        pads,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _direct(x_BHWC: Array, w_HWIO: Array, pads: Pads, dilation: tuple[int, int]) -> Array:
    return _canonical_conv(x_BHWC, w_HWIO, pads, rhs_dilation=dilation)


def _direct_fwd(x_BHWC, w_HWIO, pads, dilation):
    y_BHWO = _canonical_conv(x_BHWC, w_HWIO, pads, rhs_dilation=dilation)
    return y_BHWO, (x_BHWC, w_HWIO)


def _direct_bwd(pads, dilation, res, g_BHWO):
    """Both gradients as NHWC/HWIO convolutions, the one form XLA's CPU runtime runs fast.

    (Autodiff's transposed convolutions swap dimension labels; inside a loop XLA on CPU then
    falls back to a slow generic loop nest.)
    """
    x_BHWC, w_HWIO = res
    span = [d * (k - 1) for d, k in zip(dilation, w_HWIO.shape[:2], strict=True)]
    full = tuple((s - lo, s - hi) for s, (lo, hi) in zip(span, pads, strict=True))
    w_flip_HWOI = jnp.flip(w_HWIO, (0, 1)).transpose(0, 1, 3, 2)
    dx_BHWC = _canonical_conv(g_BHWO, w_flip_HWOI, full, rhs_dilation=dilation)
    # Channels as the batch, the batch as the features: the kernel gradient is a convolution of
    # the input by the output gradient, striding by the dilation.
    dw_CHWO = _canonical_conv(
        x_BHWC.transpose(3, 1, 2, 0), g_BHWO.transpose(1, 2, 0, 3), pads, window_strides=dilation
    )
    return dx_BHWC, dw_CHWO.transpose(1, 2, 0, 3)


_direct.defvjp(_direct_fwd, _direct_bwd)


def _conv_direct(x, w, stride, pads, dilation, groups, out_hw):
    """XLA's convolution with a hand-written backward pass (stride 1, groups 1)."""
    del stride, groups, out_hw
    return _direct(x, w, pads, dilation)


def _native_dense(x, w, stride, pads, dilation, groups, out_hw):
    """A kernel that covers the unpadded input (checked by conv2d): x (B, K) @ w (K, O)."""
    del stride, pads, dilation, groups, out_hw
    b, o = x.shape[0], w.shape[3]
    return native.dense(x.reshape(b, -1), w.reshape(-1, o)).reshape(b, 1, 1, o)


_LOWERINGS: dict[str, Callable[..., Array]] = {
    "xla": _conv_xla,
    "dense": _conv_dense,
    "pointwise": _conv_pointwise,
    "im2col": _conv_im2col,
    "direct": _conv_direct,
}  # and "native": `native.conv`, which also takes the bias, relu and statistics, or
# `_native_dense` for a kernel that covers the input


# ----------------------------------------------------------------------------- pooling
def _pool_args(layer, x, window, stride, padding):
    chex.assert_rank(
        x, 4, custom_message=f"{layer}: input must be NHWC (rank 4), got shape {tuple(x.shape)}"
    )
    win = pair(window, "window")
    st = win if stride is None else pair(stride, "stride")
    pads = resolve_padding(padding, (x.shape[1], x.shape[2]), win, st)
    _check_fits(layer, x, win, pads, "the pooling window")
    return win, st, pads, output_hw((x.shape[1], x.shape[2]), win, st, pads)


def _is_tiling(x, win, st, pads) -> bool:
    return win == st and pads == ((0, 0), (0, 0))


def _tiles(x, win, out_hw):
    """Non-overlapping windows as axes: (B, Ho, kh, Wo, kw, C)."""
    (kh, kw), (ho, wo) = win, out_hw
    x = x[:, : ho * kh, : wo * kw, :]
    return x.reshape(x.shape[0], ho, kh, wo, kw, x.shape[3])


def max_pool(
    x_BHWC: Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
) -> Array:
    """Max over windows (stride defaults to the window). Padding counts as -inf."""
    win, st, pads, out_hw = _pool_args("max_pool", x_BHWC, window, stride, padding)
    if _is_tiling(x_BHWC, win, st, pads):
        return _tiled_max(x_BHWC, win, out_hw)
    init = np.array(-np.inf, x_BHWC.dtype)  # a constant, so reduce_window has a VJP
    return lax.reduce_window(
        x_BHWC, init, lax.max, (1, *win, 1), (1, *st, 1), ((0, 0), *pads, (0, 0))
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _tiled_max(x_BHWC: Array, win: tuple[int, int], out_hw: tuple[int, int]) -> Array:
    """Max over non-overlapping windows, with reduce_window's derivative (see `_tiled_max_jvp`)."""
    return jnp.max(_tiles(x_BHWC, win, out_hw), axis=(2, 4))


@_tiled_max.defjvp
def _tiled_max_jvp(win, out_hw, primals, tangents):
    """The derivative follows the first maximum of each window in row-major order.

    That is `lax.reduce_window`'s (and PyTorch's) rule; jnp.max's own rule splits it among ties.
    The window's positions are visited in order, each taking the derivative if it equals the max
    and no earlier one did: boolean masks that XLA fuses into the neighbouring passes (measured
    ~12% faster on tiny's step than an argmax index, BENCHMARKS.md).
    """
    (x_BHWC,), (dx_BHWC,) = primals, tangents
    x_BHIWJC, dx_BHIWJC = _tiles(x_BHWC, win, out_hw), _tiles(dx_BHWC, win, out_hw)
    taps = [(i, j) for i in range(win[0]) for j in range(win[1])]
    y_BHWC = functools.reduce(jnp.maximum, [x_BHIWJC[:, :, i, :, j, :] for i, j in taps])
    taken_BHWC = jnp.zeros(y_BHWC.shape, bool)
    dy_BHWC = jnp.zeros(y_BHWC.shape, dx_BHWC.dtype)
    for i, j in taps:
        first_BHWC = (x_BHIWJC[:, :, i, :, j, :] == y_BHWC) & ~taken_BHWC
        dy_BHWC = dy_BHWC + jnp.where(first_BHWC, dx_BHIWJC[:, :, i, :, j, :], 0.0)
        taken_BHWC = taken_BHWC | first_BHWC
    return y_BHWC, dy_BHWC


def avg_pool(
    x_BHWC: Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
    count_include_pad: bool = True,
) -> Array:
    """Mean over windows (stride defaults to the window)."""
    win, st, pads, out_hw = _pool_args("avg_pool", x_BHWC, window, stride, padding)
    if _is_tiling(x_BHWC, win, st, pads):
        return jnp.mean(_tiles(x_BHWC, win, out_hw), axis=(2, 4))
    zero = np.array(0, x_BHWC.dtype)
    dims, strides, padding_ = (1, *win, 1), (1, *st, 1), ((0, 0), *pads, (0, 0))
    total = lax.reduce_window(x_BHWC, zero, lax.add, dims, strides, padding_)
    if count_include_pad:
        return total / jnp.array(win[0] * win[1], x_BHWC.dtype)
    ones = jnp.ones((1, x_BHWC.shape[1], x_BHWC.shape[2], 1), x_BHWC.dtype)
    return total / lax.reduce_window(ones, zero, lax.add, dims, strides, padding_)


def global_avg_pool(x_BHWC: Array) -> Array:
    """Mean over all positions: (B, H, W, C) -> (B, C)."""
    chex.assert_rank(
        x_BHWC,
        4,
        custom_message=f"global_avg_pool: input must be NHWC (rank 4), got {tuple(x_BHWC.shape)}",
    )
    return jnp.mean(x_BHWC, axis=(1, 2))


# ----------------------------------------------------------------------------- normalization
def batch_norm(
    x_BHWC: Array,
    scale_C: Array,
    bias_C: Array,
    mean_C: Array,
    var_C: Array,
    *,
    train: bool,
    momentum: float = 0.9,
    eps: float = 1e-5,
    mask_B: Array | None = None,
    sums_B2C: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Batch normalization; returns (y, new_running_mean, new_running_var).

    train=True normalizes with the batch statistics (over B, H, W; rows with mask_B == 0 are
    left out) and updates the running ones: new = momentum * old + (1 - momentum) * batch.
    train=False uses the running statistics and returns them unchanged.
    sums_B2C: each image's sum of x and of x * x per channel, if the layer before took them
    (`conv2d(stats=True)`); they must be x's. Gradients flow through x alone.
    """
    sums_B2C = _check_bn("batch_norm", x_BHWC, scale_C, bias_C, mean_C, var_C, mask_B, sums_B2C)
    if not train:
        r_C = lax.rsqrt(var_C + jnp.asarray(eps, x_BHWC.dtype))
        return _bn_apply(x_BHWC, mean_C, r_C, scale_C, bias_C), mean_C, var_C
    y, mean, var = _batch_norm_train(x_BHWC, scale_C, bias_C, mask_B, sums_B2C, float(eps))
    return y, *_running_stats(mean_C, var_C, mean, var, momentum)


def batch_norm_affine(
    x_BHWC: Array,
    scale_C: Array,
    bias_C: Array,
    mean_C: Array,
    var_C: Array,
    *,
    train: bool,
    momentum: float = 0.9,
    eps: float = 1e-5,
    mask_B: Array | None = None,
    sums_B2C: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
    """Batch norm as the per-channel affine map it applies: (inv_C, shift_C, new_running_mean,
    new_running_var) with batch_norm(x) = x * inv + shift, for `fold_affine` into the next
    convolution (x itself is not written). Statistics as in `batch_norm`; in training the
    gradients reach x through them: through sums_B2C (not stopped here, so the layer that took
    them must pass their cotangent on, as `conv2d(stats=True)` does) or through x's own sums.
    """
    sums_B2C = _check_bn(
        "batch_norm_affine", x_BHWC, scale_C, bias_C, mean_C, var_C, mask_B, sums_B2C,
        stop=False,
    )  # fmt: skip
    if not train:
        mean, r = mean_C, lax.rsqrt(var_C + jnp.asarray(eps, x_BHWC.dtype))
    else:
        mean, _, var, r = _bn_stats(x_BHWC, mask_B, sums_B2C, float(eps))
        mean_C, var_C = _running_stats(mean_C, var_C, mean, var, momentum)
    return *_bn_affine(mean, r, scale_C, bias_C), mean_C, var_C


def fold_affine(w_HWIO: Array, b_O: Array | None, inv_C: Array, shift_C: Array):
    """(w', b') with conv(x * inv + shift, w) + b == conv(x, w') + b' wherever every tap of the
    convolution reads x (no padding; groups=1)."""
    chex.assert_shape((inv_C, shift_C), (w_HWIO.shape[2],))
    w2 = w_HWIO * inv_C.reshape(1, 1, -1, 1)
    b2 = jnp.einsum("hwio,i->o", w_HWIO, shift_C)
    return w2, b2 if b_O is None else b_O + b2


def batch_norm_max_pool(
    x_BHWC: Array,
    scale_C: Array,
    bias_C: Array,
    mean_C: Array,
    var_C: Array,
    window: int | Sequence[int],
    *,
    train: bool,
    momentum: float = 0.9,
    eps: float = 1e-5,
    mask_B: Array | None = None,
    sums_B2C: Array | None = None,
    impl: str = "auto",
) -> tuple[Array, Array, Array]:
    """max_pool(batch_norm(x), window) over non-overlapping windows (stride = window, VALID);
    returns (y, new_running_mean, new_running_var) as `batch_norm`.

    impl "native" (chosen by "auto" when training on the CPU with `cnn.native`): one pass
    normalizes and pools, so the normalized x is never written, and the backward pass takes
    batch norm's sums from the pooled gradient alone. "xla": the two layers as they are.
    """
    win = pair(window, "window")
    sums_B2C = _check_bn(
        "batch_norm_max_pool", x_BHWC, scale_C, bias_C, mean_C, var_C, mask_B, sums_B2C
    )
    chex.assert_rank(x_BHWC, 4, custom_message="batch_norm_max_pool: input must be NHWC")
    if impl not in ("auto", "native", "xla"):
        raise ValueError(f"batch_norm_max_pool: impl must be auto, native or xla, got {impl!r}")
    ok = train and native.supports_bn_max_pool(x_BHWC.shape, win, x_BHWC.dtype)
    if impl == "native" and not ok:
        raise ValueError(
            "batch_norm_max_pool: impl='native' needs train=True, float32, 8, 16, 24 or 32"
            " channels and a window of at most 255 values within the input; got"
            f" train={train}, {x_BHWC.dtype}, window {win}, input {x_BHWC.shape}"
        )
    if impl == "xla" or (impl == "auto" and not (ok and native.available())):
        y, new_mean, new_var = batch_norm(
            x_BHWC, scale_C, bias_C, mean_C, var_C, train=train, momentum=momentum, eps=eps,
            mask_B=mask_B, sums_B2C=sums_B2C,
        )  # fmt: skip
        return max_pool(y, win), new_mean, new_var
    y, mean, var = _bn_pool_train(x_BHWC, scale_C, bias_C, mask_B, sums_B2C, win, float(eps))
    return y, *_running_stats(mean_C, var_C, mean, var, momentum)


def conv2d_batch_norm_max_pool(
    x_BHWC: Array,
    w_HWIO: Array,
    b_O: Array | None,
    scale_C: Array,
    bias_C: Array,
    mean_C: Array,
    var_C: Array,
    window: int | Sequence[int],
    *,
    padding: PaddingLike = "VALID",
    train: bool,
    momentum: float = 0.9,
    eps: float = 1e-5,
    mask_B: Array | None = None,
    impl: str = "auto",
) -> tuple[Array, Array, Array]:
    """batch_norm_max_pool(relu(conv2d(x, w, b, padding=padding, impl=impl)), window): the
    pooled output, new running mean and var. Stride 1, no dilation, groups 1.

    Where conv2d would run `native.conv` when training (and the pool is native too), one custom
    VJP: the gradient that batch norm and the pool give the conv's output is made image by image
    where the conv's input- and kernel-gradient kernels read it (`native.conv_pool_grads`),
    never written. The same bits as the layers one after another, which every other case runs.
    """
    win = pair(window, "window")
    chosen, _, _, pads, out_hw, dense = _conv_plan(x_BHWC, w_HWIO, b_O, 1, padding, 1, 1, impl)
    y_shape = (x_BHWC.shape[0], *out_hw, w_HWIO.shape[3])
    fused = (
        train
        and chosen == "native"
        and not dense
        and native.available()
        and native.supports_bn_max_pool(y_shape, win, x_BHWC.dtype)
    )
    if not fused:
        y_BHWO, sums_B2C = conv2d(
            x_BHWC, w_HWIO, b_O, padding=padding, impl=impl, activation="relu", stats=True
        )
        return batch_norm_max_pool(
            y_BHWO, scale_C, bias_C, mean_C, var_C, win, train=train, momentum=momentum,
            eps=eps, mask_B=mask_B, sums_B2C=sums_B2C,
        )  # fmt: skip
    y_spec = jax.ShapeDtypeStruct(y_shape, x_BHWC.dtype)
    _check_bn("conv2d_batch_norm_max_pool", y_spec, scale_C, bias_C, mean_C, var_C, mask_B, None)
    y, mean, var = _conv_bn_pool_train(
        x_BHWC, w_HWIO, b_O, scale_C, bias_C, mask_B, pads, win, float(eps)
    )
    return y, *_running_stats(mean_C, var_C, mean, var, momentum)


def conv2d_relu_conv1x1(
    x_BHWC: Array,
    w_HWIO: Array,
    b_O: Array | None,
    w1x1_HWIO: Array,
    b1x1_O: Array | None,
    *,
    padding: PaddingLike = "VALID",
    impl: str = "auto",
) -> Array:
    """relu(conv2d(relu(conv2d(x, w, b, padding=padding)), w1x1, b1x1)): a conv, then a 1x1
    conv (w1x1: (1, 1, O, N)), each relu'd. Stride 1, no dilation, groups 1.

    Where conv2d would run `native.conv` for both and the conv has 8, 16, 24 or 32 outputs,
    `native.conv_pw`: one call for both forward, the 1x1 reading the conv's output in cache,
    and one for both kernels' gradients, whose gradient in that output is never written. The
    same bits as the two layers one after another, which every other case runs.
    """
    chosen, _, _, pads, out_hw, dense = _conv_plan(x_BHWC, w_HWIO, b_O, 1, padding, 1, 1, impl)
    c_mid = int(w_HWIO.shape[3])
    if w1x1_HWIO.ndim != 4 or tuple(w1x1_HWIO.shape[:3]) != (1, 1, c_mid):
        raise ValueError(
            f"conv2d_relu_conv1x1: w1x1 must be a 1x1 HWIO kernel (1, 1, {c_mid}, N) taking the"
            f" conv's {c_mid} outputs, got {tuple(w1x1_HWIO.shape)}"
        )
    c_out = int(w1x1_HWIO.shape[3])
    if b1x1_O is not None and tuple(b1x1_O.shape) != (c_out,):
        raise ValueError(
            f"conv2d_relu_conv1x1: b1x1 must have shape ({c_out},), got {tuple(b1x1_O.shape)}"
        )
    # the 1x1's plan, as conv2d would make it, on a stand-in for the conv's output (zero strides)
    a_BHWO = np.broadcast_to(np.zeros((), x_BHWC.dtype), (x_BHWC.shape[0], *out_hw, c_mid))
    chosen2, *_, dense2 = _conv_plan(a_BHWO, w1x1_HWIO, b1x1_O, 1, "VALID", 1, 1, impl)
    fused = (
        chosen == chosen2 == "native"
        and not dense
        and not dense2
        and native.available()
        and native.supports_conv_pw(x_BHWC.shape[3], c_mid, c_out, x_BHWC.dtype)
    )
    if not fused:
        a_BHWO = conv2d(x_BHWC, w_HWIO, b_O, padding=padding, impl=impl, activation="relu")
        return conv2d(a_BHWO, w1x1_HWIO, b1x1_O, impl=impl, activation="relu")
    return native.conv_pw(x_BHWC, w_HWIO, b_O, w1x1_HWIO, b1x1_O, pads)


def _check_bn(where, x_BHWC, scale_C, bias_C, mean_C, var_C, mask_B, sums_B2C, stop=True):
    """Shape checks of batch norm's arguments; returns sums_B2C, its gradient path stopped
    unless stop=False."""
    c = x_BHWC.shape[-1]
    chex.assert_rank(
        x_BHWC, {2, 4}, custom_message=f"{where}: input must be (B, C) or NHWC, got {x_BHWC.shape}"
    )
    chex.assert_shape(
        (scale_C, bias_C, mean_C, var_C),
        (c,),
        custom_message=f"{where}: scale, bias, mean and var must have shape ({c},)",
    )
    if mask_B is not None:
        chex.assert_shape(
            mask_B,
            (x_BHWC.shape[0],),
            custom_message=f"{where}: mask must have shape ({x_BHWC.shape[0]},)",
        )
    if sums_B2C is None:
        return None
    chex.assert_shape(
        sums_B2C,
        (x_BHWC.shape[0], 2, c),
        custom_message=f"{where}: sums must have shape ({x_BHWC.shape[0]}, 2, {c})",
    )
    return lax.stop_gradient(sums_B2C) if stop else sums_B2C


def _running_stats(mean_C, var_C, mean, var, momentum):
    m = jnp.asarray(momentum, mean_C.dtype)
    new_mean = m * mean_C + (1 - m) * lax.stop_gradient(mean)
    return new_mean, m * var_C + (1 - m) * lax.stop_gradient(var)


def _bn_weights(x: Array, mask_B: Array | None) -> tuple[Array | None, Array]:
    """Row weights broadcastable to x (None: every row counts) and the number of counted values."""
    if mask_B is None:
        return None, jnp.asarray(x.size // x.shape[-1], x.dtype)
    w = mask_B.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return w, jnp.maximum(jnp.sum(w) * (x.size // x.shape[0] // x.shape[-1]), 1)


def _per_channel(v_C: Array, x: Array) -> Array:
    return v_C.reshape((1,) * (x.ndim - 1) + (-1,))


def _bn_affine(mean_C, r_C, scale_C, bias_C):
    """(inv, shift): batch norm as x * inv + shift, for r = rsqrt(variance + eps)."""
    inv = r_C * scale_C
    return inv, bias_C - mean_C * inv


def _bn_apply(x, mean_C, r_C, scale_C, bias_C):
    """(x - mean) * r * scale + bias, as one multiply-add per value."""
    inv, shift = _bn_affine(mean_C, r_C, scale_C, bias_C)
    return x * _per_channel(inv, x) + _per_channel(shift, x)


def _bn_stats(x, mask_B, sums_B2C, eps):
    """Batch mean, raw variance (before clipping at 0), variance and rsqrt(variance + eps)."""
    axes = tuple(range(x.ndim - 1))
    w, count = _bn_weights(x, mask_B)
    if sums_B2C is None:
        xw = x if w is None else x * w
        sum_C, sum_sq_C = jnp.sum(xw, axis=axes), jnp.sum(xw * x, axis=axes)
    else:  # taken by the layer before, per image: only the B images' sums are added here
        sw = sums_B2C if mask_B is None else sums_B2C * mask_B.astype(x.dtype).reshape(-1, 1, 1)
        sum_C, sum_sq_C = jnp.sum(sw, axis=0)
    mean = sum_C / count
    var_raw = sum_sq_C / count - jnp.square(mean)
    var = jnp.maximum(var_raw, 0)
    return mean, var_raw, var, lax.rsqrt(var + jnp.asarray(eps, x.dtype))


def _bn_forward(x, scale_C, bias_C, mask_B, sums_B2C, eps):
    mean, var_raw, var, r = _bn_stats(x, mask_B, sums_B2C, eps)
    y = _bn_apply(x, mean, r, scale_C, bias_C)
    return (y, mean, var), (x, scale_C, mask_B, mean, var_raw, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _batch_norm_train(x, scale_C, bias_C, mask_B, sums_B2C, eps):
    """(y, batch mean, batch var) with a hand-written backward pass.

    Autodiff of the same formulas makes XLA on CPU read the activations in several more passes;
    `_batch_norm_train_bwd` reads them twice. Tests hold it to autodiff's gradients.
    """
    return _bn_forward(x, scale_C, bias_C, mask_B, sums_B2C, eps)[0]


def _batch_norm_train_bwd(eps, res, cotangents):
    del eps
    x, scale_C, mask_B, mean, var_raw, r = res
    g, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    w, count = _bn_weights(x, mask_B)
    d_bias = jnp.sum(g, axis=axes)
    d_inv = jnp.sum(g * (x - _per_channel(mean, x)), axis=axes)  # y = x*inv + bias - mean*inv
    inv, d_scale, c1, c2 = _bn_grad_terms(
        d_bias, d_inv, g_mean, g_var, scale_C, mean, var_raw, r, count
    )
    d_x = g * _per_channel(inv, x) + (_per_channel(c1, x) + x * _per_channel(c2, x)) * (
        1 if w is None else w
    )
    return d_x, d_scale, d_bias, _no_gradient(mask_B), None  # sums: through x


def _bn_grad_terms(d_bias, d_inv, g_mean, g_var, scale_C, mean, var_raw, r, count):
    """From batch norm's two reductions of its output gradient (sum g, sum g * (x - mean)):
    inv, the scale's gradient, and c1, c2 of the input gradient g * inv + (c1 + x * c2) * w."""
    inv = r * scale_C
    d_scale = d_inv * r
    d_var = g_var - 0.5 * (d_inv * scale_C) * r * r * r  # d rsqrt(v)/dv = -r^3 / 2
    tie = jnp.where(var_raw == 0, 0.5, 0.0).astype(r.dtype)  # jnp.maximum's derivative at a tie
    d_var_raw = d_var * jnp.where(var_raw > 0, 1.0, tie).astype(r.dtype)
    d_mean = g_mean - inv * d_bias - 2 * mean * d_var_raw
    return inv, d_scale, d_mean / count, 2 * d_var_raw / count


def _no_gradient(a: Array | None):
    """The zero cotangent of an input treated as data (float0 for integer and bool arrays)."""
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


_batch_norm_train.defvjp(_bn_forward, _batch_norm_train_bwd)


class _BnPoolResiduals(NamedTuple):
    """What the batch-norm-max-pool backward reads: x_BHWC, each window's place of its maximum
    (at) and the input there (x_at, pooled size), and the statistics it was normalized by."""

    x: Array
    at: Array
    x_at: Array
    scale_C: Array
    mask_B: Array | None
    mean: Array
    var_raw: Array
    r: Array


def _bn_pool_forward(x, scale_C, bias_C, mask_B, sums_B2C, win, eps):
    mean, var_raw, var, r = _bn_stats(x, mask_B, sums_B2C, eps)
    y, at, x_at = native.bn_max_pool(x, *_bn_affine(mean, r, scale_C, bias_C), win)
    return (y, mean, var), _BnPoolResiduals(x, at, x_at, scale_C, mask_B, mean, var_raw, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _bn_pool_train(x, scale_C, bias_C, mask_B, sums_B2C, win, eps):
    """(max_pool(batch norm(x)), batch mean, batch var): native passes, forward and backward."""
    return _bn_pool_forward(x, scale_C, bias_C, mask_B, sums_B2C, win, eps)[0]


def _bn_pool_grad_terms(res: _BnPoolResiduals, cotangents):
    """From the pooled gradient: (inv, c1, c2, w_B), the terms of batch norm's input gradient
    (`native.bn_max_pool_grad`), and the gradients in scale and bias."""
    g_y, g_mean, g_var = cotangents
    w, count = _bn_weights(res.x, res.mask_B)
    d_bias, d_inv = jnp.sum(native.bn_max_pool_sums(g_y, res.x_at, res.mean), axis=0)
    inv, d_scale, c1, c2 = _bn_grad_terms(
        d_bias, d_inv, g_mean, g_var, res.scale_C, res.mean, res.var_raw, res.r, count
    )
    w_B = jnp.ones(res.x.shape[0], res.x.dtype) if w is None else w.reshape(-1)
    return (inv, c1, c2, w_B), d_scale, d_bias


def _bn_pool_backward(win, eps, res: _BnPoolResiduals, cotangents):
    del eps
    terms, d_scale, d_bias = _bn_pool_grad_terms(res, cotangents)
    d_x = native.bn_max_pool_grad(cotangents[0], res.at, res.x, *terms, win)
    return d_x, d_scale, d_bias, _no_gradient(res.mask_B), None


_bn_pool_train.defvjp(_bn_pool_forward, _bn_pool_backward)


def _conv_bn_pool_forward(x, w_HWIO, b_O, scale_C, bias_C, mask_B, pads, win, eps):
    a, sums_B2C = native.conv(x, w_HWIO, pads, b_O, relu=True, stats=True)
    outs, bn_res = _bn_pool_forward(a, scale_C, bias_C, mask_B, sums_B2C, win, eps)
    return outs, (x, w_HWIO, b_O, bn_res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _conv_bn_pool_train(x, w_HWIO, b_O, scale_C, bias_C, mask_B, pads, win, eps):
    """(max_pool(batch norm(relu(conv(x) + b))), batch mean, batch var), natively."""
    return _conv_bn_pool_forward(x, w_HWIO, b_O, scale_C, bias_C, mask_B, pads, win, eps)[0]


def _conv_bn_pool_backward(pads, win, eps, res, cotangents):
    del eps
    x, w_HWIO, b_O, bn_res = res  # bn_res.x: the relu'd conv output that was normalized
    terms, d_scale, d_bias = _bn_pool_grad_terms(bn_res, cotangents)
    dx, dw, db = native.conv_pool_grads(
        x, w_HWIO, b_O, pads, bn_res.x, cotangents[0], bn_res.at, *terms, win
    )
    return dx, dw, db, d_scale, d_bias, _no_gradient(bn_res.mask_B)


_conv_bn_pool_train.defvjp(_conv_bn_pool_forward, _conv_bn_pool_backward)


def _mix32(x: Array) -> Array:
    """A 32-bit integer hash (lowbias32): each output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniform_bits(key: Array, shape: tuple[int, ...]) -> Array:
    """uint32 pseudo-random bits from a counter-based hash of (key, position).

    XLA on CPU draws threefry bits slowly (about 30 ms for 700k of them, and seconds to
    compile); this elementwise hash fuses into its consumer and costs about as much as a copy.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    counter = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) if shape else jnp.uint32(0)
    return _mix32(_mix32(counter ^ seed[0]) ^ seed[1])


def dropout(key: Array, x: Array, rate: float, *, deterministic: bool = False) -> Array:
    """Zeroes each unit with probability `rate` (the DROP rate); scales the rest by 1/(1-rate)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(
            f"dropout: rate is the probability of dropping a unit, in [0, 1]; got {rate}"
        )
    if deterministic or rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    keep = uniform_bits(key, x.shape) >= threshold
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------- initializers
Initializer = Callable[..., Array]
INITIALIZERS: dict[str, Initializer] = {
    "he_normal": jax.nn.initializers.he_normal(),
    "he_uniform": jax.nn.initializers.he_uniform(),
    "glorot_normal": jax.nn.initializers.glorot_normal(),
    "glorot_uniform": jax.nn.initializers.glorot_uniform(),
    "lecun_normal": jax.nn.initializers.lecun_normal(),
    "lecun_uniform": jax.nn.initializers.lecun_uniform(),
    "zeros": jax.nn.initializers.zeros,
    "ones": jax.nn.initializers.ones,
}
he_normal = INITIALIZERS["he_normal"]
he_uniform = INITIALIZERS["he_uniform"]
glorot_normal = INITIALIZERS["glorot_normal"]
glorot_uniform = INITIALIZERS["glorot_uniform"]
lecun_normal = INITIALIZERS["lecun_normal"]
lecun_uniform = INITIALIZERS["lecun_uniform"]


def initializer(init: str | Initializer) -> Initializer:
    """An initializer by name (see INITIALIZERS) or the callable itself.

    Fans follow HWIO: fan_in = kh * kw * in_channels, fan_out = kh * kw * out_channels.
    """
    if callable(init):
        return init
    try:
        return INITIALIZERS[init]
    except KeyError:
        raise ValueError(
            f"unknown initializer {init!r}; valid names: {', '.join(sorted(INITIALIZERS))}"
        ) from None
