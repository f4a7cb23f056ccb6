"""cnn.augment: normalization and random rotation/translation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import augment as A
from cnn import native

BLACK = A.NORMALIZED_BLACK  # normalize(0)


def images(b=4, h=28, w=28, c=1, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, c), dtype=np.uint8)


def test_normalize():
    x = images()
    y = A.normalize(x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), (x / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
    zero = A.normalize(jnp.zeros((1, 1, 1, 1), jnp.uint8))
    np.testing.assert_allclose(np.asarray(zero).item(), BLACK, rtol=1e-6)
    assert A.MNIST_MEAN == 0.1307 and A.MNIST_STD == 0.3081


@pytest.mark.parametrize("shape", [(4, 28, 28, 1), (3, 20, 24, 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.uint8])
def test_shape_and_dtype_preserved(dtype, shape):
    x = jnp.asarray(images(*shape)).astype(dtype)
    y = A.augment(jax.random.key(0), x, max_rotation_deg=20.0, max_translation_px=3.0)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_identity_when_disabled():
    x = A.normalize(images())
    y = A.augment(jax.random.key(0), x)
    assert y is x
    y = A.augment(jax.random.key(1), x, max_rotation_deg=0.0, max_translation_px=0, fill=BLACK)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    # The warp itself is also exact at zero angle and shift.
    z = A.affine_warp(x, jnp.zeros(4), jnp.zeros((4, 2)))
    np.testing.assert_array_equal(np.asarray(z), np.asarray(x))


def test_deterministic_per_key_and_keys_differ():
    x = A.normalize(images())
    kw = dict(max_rotation_deg=15.0, max_translation_px=2.0, fill=BLACK)
    a = A.augment(jax.random.key(3), x, **kw)
    b = A.augment(jax.random.key(3), x, **kw)
    c = A.augment(jax.random.key(4), x, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    # Per example: different images in the batch get different transforms.
    theta_B, shift_B2 = A.augment_params(
        jax.random.key(3), 4, max_rotation_deg=15.0, max_translation_px=2.0
    )
    assert len(set(np.asarray(theta_B).tolist())) == 4
    np.testing.assert_array_equal(
        np.asarray(a), np.asarray(A.affine_warp(x, theta_B, shift_B2, fill=BLACK))
    )


def test_params_within_bounds():
    theta_B, shift_B2 = A.augment_params(
        jax.random.key(0), 4096, max_rotation_deg=10.0, max_translation_px=3.0
    )
    assert theta_B.shape == (4096,) and shift_B2.shape == (4096, 2)
    assert theta_B.dtype == shift_B2.dtype == jnp.float32
    t, s = np.abs(np.asarray(theta_B)), np.abs(np.asarray(shift_B2))
    assert t.max() <= math.radians(10.0) and t.max() > 0.9 * math.radians(10.0)
    assert s.max() <= 3.0 and s.max() > 2.7


def test_rotate_90_matches_rot90():
    x = images().astype(np.float32)
    ccw = A.affine_warp(jnp.asarray(x), jnp.full(4, math.pi / 2), jnp.zeros((4, 2)))
    np.testing.assert_allclose(np.asarray(ccw), np.rot90(x, 1, axes=(1, 2)), atol=1e-3)
    cw = A.affine_warp(jnp.asarray(x), jnp.full(4, -math.pi / 2), jnp.zeros((4, 2)))
    np.testing.assert_allclose(np.asarray(cw), np.rot90(x, -1, axes=(1, 2)), atol=1e-3)


def test_rotate_90_moves_a_pixel_where_expected():
    # One bright pixel up-right of the centre; a CCW quarter turn takes (r, c) to (W-1-c, r).
    x = np.zeros((4, 28, 28, 1), np.float32)
    x[:, 5, 20, 0] = 1.0
    y = np.asarray(A.affine_warp(jnp.asarray(x), jnp.full(4, math.pi / 2), jnp.zeros((4, 2))))
    assert np.unravel_index(np.argmax(y[0]), y[0].shape) == (7, 5, 0)
    assert y[0, 7, 5, 0] == pytest.approx(1.0, abs=1e-4) and y[0].sum() == pytest.approx(1.0, 1e-4)


@pytest.mark.parametrize("dy, dx", [(2, -3), (-5, 0), (0, 4), (1, 1)])
def test_integer_translation_is_roll_with_fill(dy, dx):
    x = np.asarray(A.normalize(images()))
    shift_B2 = jnp.tile(jnp.array([[dy, dx]], jnp.float32), (4, 1))
    y = A.affine_warp(jnp.asarray(x), jnp.zeros(4), shift_B2, fill=BLACK)
    expected = np.roll(x, (dy, dx), axis=(1, 2))
    if dy > 0:
        expected[:, :dy] = BLACK
    elif dy < 0:
        expected[:, dy:] = BLACK
    if dx > 0:
        expected[:, :, :dx] = BLACK
    elif dx < 0:
        expected[:, :, dx:] = BLACK
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-6)


def test_fill_is_used_outside_and_rotation_keeps_centre():
    x = jnp.ones((4, 28, 28, 1), jnp.float32)
    y = np.asarray(A.affine_warp(x, jnp.full(4, math.pi / 4), jnp.zeros((4, 2)), fill=-1.0))
    assert y[0, 0, 0, 0] == pytest.approx(-1.0) and y[0, 14, 14, 0] == pytest.approx(1.0)
    assert y.min() >= -1.0 - 1e-6 and y.max() <= 1.0 + 1e-6


def test_jit_matches_eager_and_traced_fill():
    x = A.normalize(images())
    key = jax.random.key(11)
    kw = dict(max_rotation_deg=30.0, max_translation_px=4.0)
    eager = A.augment(key, x, fill=BLACK, **kw)
    # Inside a user's jit; fill may be a traced value (e.g. normalize(0) computed in the step).
    traced = jax.jit(
        lambda k, x: A.augment(k, x, fill=A.normalize(jnp.zeros((), jnp.uint8)), **kw)
    )(key, x)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), atol=1e-5)


def test_strict_promotion():
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        x = A.normalize(images())
        y = A.augment(jax.random.key(0), x, max_rotation_deg=10.0, max_translation_px=1.0)
        assert y.dtype == jnp.float32
        u = A.augment(jax.random.key(0), jnp.asarray(images()), max_rotation_deg=10.0)
        assert u.dtype == jnp.uint8


def test_augment_batch_leaves_labels_and_mask():
    labels = jnp.arange(4, dtype=jnp.int32)
    mask = jnp.array([1.0, 1.0, 1.0, 0.0], jnp.float32)
    batch = {"image": A.normalize(images()), "label": labels, "mask": mask}
    out = A.augment_batch(jax.random.key(0), batch, max_rotation_deg=10.0, fill=BLACK)
    assert out["label"] is labels and out["mask"] is mask and batch["label"] is labels
    assert out["image"].shape == batch["image"].shape
    assert not np.array_equal(np.asarray(out["image"]), np.asarray(batch["image"]))
    assert out is not batch and batch["image"] is not out["image"]


def test_validation():
    x = A.normalize(images())
    with pytest.raises(ValueError, match="must be >= 0"):
        A.augment(jax.random.key(0), x, max_rotation_deg=-1.0)
    with pytest.raises(ValueError, match=r"expected images \(B, H, W, C\)"):
        A.augment(jax.random.key(0), x[0], max_translation_px=1.0)


@pytest.mark.parametrize(
    "deg, px, h, w",
    [(7.0, 0.0, 28, 28), (7.0, 1.0, 28, 28), (3.0, 2.0, 28, 28), (10.0, 0.0, 9, 13)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_window_sampling_equals_the_gather(deg, px, h, w, dtype):
    """Small warps skip the gather: same values at the strength limits and inside them."""
    x = images(b=64, h=h, w=w, c=2, seed=5).astype(dtype)
    theta_B, shift_B2 = A.augment_params(
        jax.random.key(7), 64, max_rotation_deg=deg, max_translation_px=px
    )
    theta_B = theta_B.at[:4].set(jnp.deg2rad(jnp.asarray([deg, -deg, deg, -deg])))
    shift_B2 = shift_B2.at[:4].set(jnp.asarray([[px, px], [-px, -px], [px, -px], [-px, px]]))
    bound = A.max_offset((h, w), deg, px)
    assert A._window(bound) > 0  # the fast path is taken
    fill = 0.0 if dtype == np.uint8 else BLACK
    fast = A.affine_warp(x, theta_B, shift_B2, fill=fill, max_offset=bound, impl="xla")
    slow = A.affine_warp(x, theta_B, shift_B2, fill=fill, impl="xla")
    if dtype == np.uint8:  # rounding may differ by one grey level at exact .5 ties
        assert np.max(np.abs(np.asarray(fast, np.int32) - np.asarray(slow, np.int32))) <= 1
    else:
        np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-6, atol=1e-4)


def test_max_offset_bounds_the_sampled_positions():
    """Every inverse-mapped position lies within max_offset of its output pixel, per axis."""
    h = w = 28
    for deg, px in [(7.0, 0.0), (7.0, 1.5), (30.0, 2.0)]:
        theta = np.deg2rad(np.linspace(-deg, deg, 41))[:, None, None]
        c = (h - 1) / 2
        v, u = np.meshgrid(np.arange(h) - c, np.arange(w) - c, indexing="ij")
        for dy in (-px, px):
            for dx in (-px, px):
                u_in = np.cos(theta) * (u - dx) - np.sin(theta) * (v - dy) + c
                v_in = np.sin(theta) * (u - dx) + np.cos(theta) * (v - dy) + c
                worst = max(np.max(np.abs(u_in - u - c)), np.max(np.abs(v_in - v - c)))
                assert worst <= A.max_offset((h, w), deg, px) + 1e-9


def test_large_warps_use_the_gather():
    assert A._window(A.max_offset((28, 28), 45.0, 0.0)) == 0
    assert A._window(A.max_offset((28, 28), 7.0, 0.0)) == 2


def _params(b, deg, px, seed=3):
    theta_B, shift_B2 = A.augment_params(
        jax.random.key(seed), b, max_rotation_deg=deg, max_translation_px=px
    )
    theta_B = theta_B.at[:4].set(jnp.deg2rad(jnp.asarray([deg, -deg, deg, -deg])))
    shift_B2 = shift_B2.at[:4].set(jnp.asarray([[px, px], [-px, -px], [px, -px], [-px, px]]))
    return theta_B, shift_B2


# native vs XLA warps of normalized MNIST-like images (values in [-0.43, 2.83]): both round
# the same four products; XLA's fused loop contracts them as the CPU's codegen decides.
WARP_ATOL = 1e-5


def _bits(a):
    return np.asarray(a).view(np.int32)


@pytest.mark.parametrize(
    "deg, px, h, w, c",
    [
        (7.0, 1.0, 28, 28, 1),
        (3.0, 0.5, 28, 28, 1),
        (0.0, 1.0, 28, 28, 1),
        (10.0, 0.0, 9, 13, 1),
        (7.0, 1.0, 28, 21, 1),
        (7.0, 1.0, 28, 28, 2),
        (5.0, 1.0, 11, 7, 3),
    ],
)
def test_native_warp_matches_xla_in_the_window(deg, px, h, w, c):
    """The native kernel (C = 1: vectorized; else scalar) against XLA's fused window sum.

    Within WARP_ATOL: how XLA's loop contracts its multiply-adds depends on the CPU and the width
    (bit for bit at 28x28 on Zen 4 and Sapphire Rapids; up to 6e-6 apart at 13 or 21 columns on
    Sapphire Rapids). "auto" runs the native kernel for one channel, bit for bit.
    """
    b = 67  # not a multiple of the threads' share
    x_BHWC = A.normalize(images(b=b, h=h, w=w, c=c, seed=2))
    theta_B, shift_B2 = _params(b, deg, px)
    bound = A.max_offset((h, w), deg, px)
    assert A._window(bound) > 0

    def warp(x, t, s, impl):
        return A.affine_warp(x, t, s, fill=BLACK, max_offset=bound, impl=impl)

    xla = jax.jit(functools.partial(warp, impl="xla"))(x_BHWC, theta_B, shift_B2)
    nat = jax.jit(functools.partial(warp, impl="native"))(x_BHWC, theta_B, shift_B2)
    assert np.any(np.asarray(xla) != BLACK)
    np.testing.assert_allclose(np.asarray(nat), np.asarray(xla), rtol=0, atol=WARP_ATOL)
    # As training calls it: normalize fused in, the draws inside, "auto" picking the kernel.
    u8 = jnp.asarray(images(b=b, h=h, w=w, c=c, seed=4))
    kw = dict(max_rotation_deg=deg, max_translation_px=px, fill=BLACK)

    def step(key, u8, impl):
        return A.augment(key, A.normalize(u8), impl=impl, **kw)

    for seed in range(3):
        key = jax.random.key(seed)
        out = {
            impl: jax.jit(functools.partial(step, impl=impl))(key, u8)
            for impl in ("auto", "native", "xla")
        }
        want = out["native"] if c == 1 else out["xla"]
        np.testing.assert_array_equal(_bits(out["auto"]), _bits(want))
        np.testing.assert_allclose(
            np.asarray(out["native"]), np.asarray(out["xla"]), rtol=0, atol=WARP_ATOL
        )


@pytest.mark.parametrize("shape", [(9, 28, 28, 2), (5, 11, 7, 3)])
def test_native_warp_with_channels_is_close_and_auto_keeps_xla(shape):
    """More channels: the scalar kernel, within 2e-6 of XLA's; "auto" keeps XLA's form."""
    x_BHWC = A.normalize(images(*shape, seed=8))
    theta_B, shift_B2 = _params(shape[0], 7.0, 1.0)
    bound = A.max_offset(shape[1:3], 7.0, 1.0)
    out = {
        impl: A.affine_warp(x_BHWC, theta_B, shift_B2, fill=BLACK, max_offset=bound, impl=impl)
        for impl in ("native", "xla", "auto")
    }
    np.testing.assert_allclose(np.asarray(out["native"]), np.asarray(out["xla"]), atol=2e-6)
    np.testing.assert_array_equal(_bits(out["auto"]), _bits(out["xla"]))
    assert not A._native_impl("auto", x_BHWC) and A._native_impl("auto", x_BHWC[..., :1])


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_native_warp_beyond_the_window_matches_the_gather(dtype):
    x = images(b=16, c=2, seed=6).astype(dtype)
    theta_B, shift_B2 = _params(16, 40.0, 5.0)
    fill = 0.0 if dtype == np.uint8 else BLACK
    nat = A.affine_warp(x, theta_B, shift_B2, fill=fill, impl="native")
    xla = A.affine_warp(x, theta_B, shift_B2, fill=fill, impl="xla")
    assert nat.dtype == xla.dtype == dtype
    if dtype == np.uint8:
        assert np.max(np.abs(np.asarray(nat, np.int32) - np.asarray(xla, np.int32))) <= 1
    else:
        np.testing.assert_allclose(np.asarray(nat), np.asarray(xla), rtol=1e-5, atol=1e-3)
    far = A.affine_warp(x, theta_B, shift_B2 + 100.0, fill=fill, impl="native")
    assert np.all(np.asarray(far) == np.asarray(jnp.asarray(fill).astype(dtype)))


def test_native_warp_gradient_is_the_xla_forms():
    x_BHWC = A.normalize(images(b=5, c=2))
    theta_B, shift_B2 = _params(5, 7.0, 1.0)
    bound = A.max_offset((28, 28), 7.0, 1.0)
    g_BHWC = jnp.asarray(np.random.default_rng(1).normal(size=x_BHWC.shape), jnp.float32)

    def loss(x, t, s, f, impl):
        out = A.affine_warp(x, t, s, fill=f, max_offset=bound, impl=impl)
        return jnp.sum(out * g_BHWC)

    args = (x_BHWC, theta_B, shift_B2, jnp.float32(BLACK))
    grads = [jax.grad(loss, argnums=(0, 1, 2, 3))(*args, impl) for impl in ("native", "xla")]
    for a, b in zip(*grads, strict=True):  # the same vjp, fused otherwise
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_native_warp_nan_and_errors():
    x_BHWC = A.normalize(images(b=3))
    theta_B = jnp.asarray([0.1, jnp.nan, 0.0], jnp.float32)
    out = np.asarray(A.affine_warp(x_BHWC, theta_B, jnp.zeros((3, 2)), impl="native"))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    with pytest.raises(ValueError, match="impl must be one of"):
        A.affine_warp(x_BHWC, theta_B, jnp.zeros((3, 2)), impl="gpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        A.augment(jax.random.key(0), x_BHWC, max_rotation_deg=1.0, impl="fast")
    with pytest.raises(ValueError, match=r"expects cos and sin \(3,\) and shift \(3, 2\)"):
        native.affine_warp(x_BHWC, theta_B, theta_B, jnp.zeros((2, 2)), 0.0, 1)
    with pytest.raises(ValueError, match=r"expects float32 \(B, H, W, C\)"):
        native.affine_warp(x_BHWC[0], theta_B, theta_B, jnp.zeros((3, 2)), 0.0, 1)
    with pytest.raises(ValueError, match="window must be >= 0"):
        native.affine_warp(x_BHWC, theta_B, theta_B, jnp.zeros((3, 2)), 0.0, -1)
