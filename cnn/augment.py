"""On-device MNIST preprocessing: normalization and random rotation/translation (pure JAX).

All functions are pure and jit-able. ``augment``'s strengths are Python floats (config), so
turning augmentation off is an exact no-op decided in Python; inside, they are traced, so one
compilation serves all strengths.
Geometry: images are (B, H, W, C) with rows going down; a positive angle rotates the content
counter-clockwise as displayed (like ``np.rot90``), about the image centre ((H-1)/2, (W-1)/2);
a shift (dy, dx) moves the content dy pixels down and dx pixels right. Each output pixel is
sampled bilinearly from the input at the inverse-mapped position; outside the image the value
is ``fill`` -- the value of a black pixel: 0.0 for raw pixels, ``normalize(0)`` (=
``NORMALIZED_BLACK = -MNIST_MEAN / MNIST_STD``) for normalized ones.

Bilinear sampling has two exact forms. Gathers are slow on XLA CPU (6 ms for 128 MNIST
images), so when every sample lies within ``window`` pixels of its output pixel (small
rotations and shifts: ``max_offset`` bounds it) the sample is a sum over the (2*window+1)^2
shifted copies of the padded image, each weighted by the bilinear "tent" weights, which are
exactly zero away from the four corners: one fused elementwise loop (0.4 ms). Otherwise it is
a flat gather, as fast as ``jax.scipy.ndimage.map_coordinates(order=1)`` (same values).
On the CPU, ``impl="auto"`` runs float32 one-channel warps as one native call instead
(``cnn.native.affine_warp``): only the four corners' terms of the shifted-copy sum, with the
multiply-adds XLA's fused loop was measured to contract at 28x28 on AMD Zen 4 and Intel
Sapphire Rapids, where the two agree bit for bit. How XLA contracts depends on the CPU and the
width (13 or 21 columns on Sapphire Rapids: up to 6e-6 apart), so the tests hold them within
1e-5, as the gather form is held. With more channels "auto" keeps XLA's form. The native
warp's gradient is the XLA form's (recomputed).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from cnn import native

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "NORMALIZED_BLACK",
    "normalize",
    "augment_params",
    "affine_warp",
    "max_offset",
    "augment",
    "augment_batch",
    "IMPLS",
]

IMPLS = ("auto", "xla", "native")

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NORMALIZED_BLACK = -MNIST_MEAN / MNIST_STD  # normalize(0): the fill for normalized images


def normalize(images_BHWC: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 ``(x / 255 - MNIST_MEAN) / MNIST_STD``."""
    x = jnp.asarray(images_BHWC).astype(jnp.float32)
    return (x / 255.0 - MNIST_MEAN) / MNIST_STD


@functools.partial(jax.jit, static_argnames="batch")
def augment_params(
    key: jax.Array, batch: int, *, max_rotation_deg: float, max_translation_px: float
) -> tuple[jax.Array, jax.Array]:
    """(theta_B radians, uniform in ±max_rotation_deg; shift_B2 (dy, dx), uniform in ±px).

    The maxima may be traced scalars (one compilation serves every strength).
    """
    k_rot, k_shift = jax.random.split(key)
    max_theta = jnp.deg2rad(jnp.asarray(max_rotation_deg, jnp.float32))
    max_shift = jnp.asarray(max_translation_px, jnp.float32)
    theta_B = max_theta * jax.random.uniform(k_rot, (batch,), jnp.float32, -1.0, 1.0)
    shift_B2 = max_shift * jax.random.uniform(k_shift, (batch, 2), jnp.float32, -1.0, 1.0)
    return theta_B, shift_B2


def _bilinear_BHWC(
    x_BHWC: jax.Array, y_BHW: jax.Array, x_pos_BHW: jax.Array, fill: jax.Array
) -> jax.Array:
    """Sample x at fractional (row, col) positions; corners outside the image count as fill."""
    B, H, W, C = x_BHWC.shape
    y0 = jnp.floor(y_BHW)
    x0 = jnp.floor(x_pos_BHW)
    wy1 = y_BHW - y0
    wx1 = x_pos_BHW - x0
    y0i = y0.astype(jnp.int32)
    x0i = x0.astype(jnp.int32)
    flat_NC = x_BHWC.reshape(B * H * W, C)  # one flat gather beats take_along_axis on CPU
    offset_B11 = (jnp.arange(B, dtype=jnp.int32) * (H * W))[:, None, None]
    out = jnp.zeros((B, H, W, C), x_BHWC.dtype)
    for dy, wy in ((0, 1.0 - wy1), (1, wy1)):
        for dx, wx in ((0, 1.0 - wx1), (1, wx1)):
            yi = y0i + dy
            xi = x0i + dx
            valid_BHW = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
            i_BHW = offset_B11 + jnp.clip(yi, 0, H - 1) * W + jnp.clip(xi, 0, W - 1)
            v_BHWC = jnp.take(flat_NC, i_BHW.reshape(-1), axis=0, mode="clip").reshape(B, H, W, C)
            v_BHWC = jnp.where(valid_BHW[..., None], v_BHWC, fill)
            out = out + (wy * wx)[..., None] * v_BHWC
    return out


def _bilinear_window_BHWC(
    x_BHWC: jax.Array, y_BHW: jax.Array, x_pos_BHW: jax.Array, fill: jax.Array, window: int
) -> jax.Array:
    """As _bilinear_BHWC when every sample is less than `window` pixels (per axis) away."""
    B, H, W, C = x_BHWC.shape
    k = window
    dy_BHW = y_BHW - jnp.arange(H, dtype=y_BHW.dtype)[None, :, None]
    dx_BHW = x_pos_BHW - jnp.arange(W, dtype=x_pos_BHW.dtype)[None, None, :]
    xp_BHWC = jnp.pad(x_BHWC, ((0, 0), (k, k), (k, k), (0, 0)), constant_values=fill)
    out = None
    for oy in range(-k, k + 1):
        row = None
        for ox in range(-k, k + 1):
            wx_BHW1 = jnp.maximum(1.0 - jnp.abs(dx_BHW - ox), 0.0)[..., None]
            term = wx_BHW1 * xp_BHWC[:, k + oy : k + oy + H, k + ox : k + ox + W, :]
            row = term if row is None else row + term
        wy_BHW1 = jnp.maximum(1.0 - jnp.abs(dy_BHW - oy), 0.0)[..., None]
        out = wy_BHW1 * row if out is None else out + wy_BHW1 * row
    return out


# Above this window the (2w+1)^2 shifted copies cost more than the gather.
_MAX_WINDOW = 3


def max_offset(hw: tuple[int, int], max_rotation_deg: float, max_translation_px: float) -> float:
    """Bound, per axis, on |sampled position - output position| of augment's warps."""
    theta = math.radians(min(float(max_rotation_deg), 90.0))
    radius = (max(hw) - 1) / 2.0
    sin, cos = math.sin(theta), math.cos(theta)
    return (sin + 1.0 - cos) * radius + (sin + cos) * max_translation_px  # shift is rotated too


def _window(offset: float | None) -> int:
    """Shifted copies needed each side for samples at most `offset` away (0: use the gather)."""
    if offset is None:
        return 0
    window = math.floor(offset + 1e-3) + 1  # margin for float rounding of the positions
    return window if window <= _MAX_WINDOW else 0


def _native_impl(impl: str, x_BHWC) -> bool:
    """Whether impl runs the warp of x natively; ValueError for a bad impl.

    "auto" takes it for float32 one-channel images only (the case measured bit for bit at
    28x28; see the module's docstring).
    """
    dtype = x_BHWC.dtype
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    compute = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
    if impl == "native":
        native.require()
        if compute != jnp.float32:
            raise ValueError(f"impl='native' warps float32 (or integer) images, got {dtype}.")
        return True
    one_channel = x_BHWC.ndim == 4 and x_BHWC.shape[-1] == 1
    return impl == "auto" and compute == jnp.float32 and one_channel and native.available()


def affine_warp(
    x_BHWC: jax.Array,
    theta_B: jax.Array,
    shift_B2: jax.Array,
    *,
    fill: float = 0.0,
    max_offset: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Rotate each image by theta_B (radians, CCW) about its centre, then shift by (dy, dx).

    One inverse affine map and bilinear sampling; keeps shape and dtype (integer images are
    rounded and clipped back to their dtype's range). ``fill`` may be a traced scalar.
    ``max_offset``: a bound on every sample's distance per axis from its output pixel (see
    ``max_offset()``), which lets small warps skip the gather; the values are the same.
    ``impl``: "xla", "native" (the CPU kernel) or "auto" (native for float32 where it runs).
    """
    x_BHWC = jnp.asarray(x_BHWC)
    use_native = _native_impl(impl, x_BHWC)
    return _affine_warp(
        x_BHWC, jnp.asarray(theta_B), jnp.asarray(shift_B2), fill, _window(max_offset), use_native
    )


def _positions(theta_B, shift_B2, shape_BHW, fdt):
    """(cos_B, sin_B, rows v_in_BHW, columns u_in_BHW): where each output pixel samples."""
    _, H, W = shape_BHW
    cy, cx = (H - 1) / 2.0, (W - 1) / 2.0
    rows_H = jnp.arange(H, dtype=fdt)
    cols_W = jnp.arange(W, dtype=fdt)
    cos_B = jnp.cos(theta_B).astype(fdt)
    sin_B = jnp.sin(theta_B).astype(fdt)
    cos_B11, sin_B11 = cos_B[:, None, None], sin_B[:, None, None]
    # Output pixel relative to the centre, minus the shift.
    v_BHW = rows_H[None, :, None] - cy - shift_B2[:, 0, None, None].astype(fdt)
    u_BHW = cols_W[None, None, :] - cx - shift_B2[:, 1, None, None].astype(fdt)
    v_BHW, u_BHW = jnp.broadcast_arrays(v_BHW, u_BHW)
    # Inverse rotation. In (right=u, up=-v) coordinates, CCW by theta is the usual matrix;
    # undoing it: u_in = cos*u - sin*v, v_in = sin*u + cos*v (v pointing down).
    u_in_BHW = cos_B11 * u_BHW - sin_B11 * v_BHW + cx
    v_in_BHW = sin_B11 * u_BHW + cos_B11 * v_BHW + cy
    return cos_B, sin_B, v_in_BHW, u_in_BHW


def _xla_warp(xf_BHWC, theta_B, shift_B2, fill, window):
    _, _, v_in_BHW, u_in_BHW = _positions(theta_B, shift_B2, xf_BHWC.shape[:3], xf_BHWC.dtype)
    if window:
        return _bilinear_window_BHWC(xf_BHWC, v_in_BHW, u_in_BHW, fill, window)
    return _bilinear_BHWC(xf_BHWC, v_in_BHW, u_in_BHW, fill)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _native_warp(xf_BHWC, theta_B, shift_B2, fill, window):
    cos_B, sin_B = jnp.cos(theta_B), jnp.sin(theta_B)
    return native.affine_warp(xf_BHWC, cos_B, sin_B, shift_B2, fill, window)


def _native_warp_fwd(xf_BHWC, theta_B, shift_B2, fill, window):
    return _native_warp(xf_BHWC, theta_B, shift_B2, fill, window), (
        xf_BHWC,
        theta_B,
        shift_B2,
        fill,
    )


def _native_warp_bwd(window, res, g_BHWC):
    _, vjp = jax.vjp(lambda *args: _xla_warp(*args, window), *res)
    return vjp(g_BHWC)


_native_warp.defvjp(_native_warp_fwd, _native_warp_bwd)


@functools.partial(jax.jit, static_argnums=(4, 5))  # compiled once per shape/dtype/window/impl
def _affine_warp(x_BHWC, theta_B, shift_B2, fill, window, use_native):
    dtype = x_BHWC.dtype
    xf_BHWC = x_BHWC if jnp.issubdtype(dtype, jnp.floating) else x_BHWC.astype(jnp.float32)
    fdt = xf_BHWC.dtype
    fill_arr = jnp.asarray(fill, dtype=fdt)
    if use_native:
        theta_B, shift_B2 = theta_B.astype(fdt), shift_B2.astype(fdt)
        out_BHWC = _native_warp(xf_BHWC, theta_B, shift_B2, fill_arr, window)
    else:
        out_BHWC = _xla_warp(xf_BHWC, theta_B, shift_B2, fill_arr, window)
    if out_BHWC.dtype != dtype:
        info = jnp.iinfo(dtype)
        out_BHWC = jnp.clip(jnp.round(out_BHWC), info.min, info.max).astype(dtype)
    return out_BHWC


def augment(
    key: jax.Array,
    x_BHWC: jax.Array,
    *,
    max_rotation_deg: float = 0.0,
    max_translation_px: float = 0.0,
    fill: float = 0.0,
    impl: str = "auto",
) -> jax.Array:
    """Per-example random rotation (±deg) and translation (±px); identity when both are 0.

    Deterministic from ``key``. ``fill`` is the value of a black pixel: 0.0 for raw pixels,
    ``NORMALIZED_BLACK`` (= normalize(0); a traced value works too) for normalized images.
    Same shape and dtype as ``x_BHWC``. ``impl`` as for :func:`affine_warp`.
    """
    max_rotation_deg = float(max_rotation_deg)
    max_translation_px = float(max_translation_px)
    if max_rotation_deg < 0 or max_translation_px < 0:
        raise ValueError(
            f"max_rotation_deg={max_rotation_deg} and max_translation_px={max_translation_px} "
            "must be >= 0."
        )
    if x_BHWC.ndim != 4:
        raise ValueError(f"expected images (B, H, W, C), got shape {x_BHWC.shape}.")
    use_native = _native_impl(impl, x_BHWC)
    if max_rotation_deg == 0.0 and max_translation_px == 0.0:
        return x_BHWC
    offset = max_offset(x_BHWC.shape[1:3], max_rotation_deg, max_translation_px)
    return _augment(
        key, x_BHWC, fill, max_rotation_deg, max_translation_px, _window(offset), use_native
    )


@functools.partial(jax.jit, static_argnums=(5, 6))  # strengths traced; one compile per window
def _augment(key, x_BHWC, fill, max_rotation_deg, max_translation_px, window, use_native):
    theta_B, shift_B2 = augment_params(
        key,
        x_BHWC.shape[0],
        max_rotation_deg=max_rotation_deg,
        max_translation_px=max_translation_px,
    )
    return _affine_warp(x_BHWC, theta_B, shift_B2, fill, window, use_native)


def augment_batch(key: jax.Array, batch: Mapping[str, jax.Array], **kwargs) -> dict:
    """Copy of ``batch`` with ``batch["image"]`` augmented (kwargs as :func:`augment`)."""
    out = dict(batch)
    out["image"] = augment(key, batch["image"], **kwargs)
    return out
