"""Pure layers against independent NumPy loop references, lax, and their own shape functions."""

from __future__ import annotations

import functools
import itertools
import random
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn import layers, native

# ----------------------------------------------------------------------------- helpers


def _rand(seed: int, shape, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def assert_close(actual, expected, rtol: float = 1e-5, err_msg: str = ""):
    """Elementwise closeness, with atol relative to the magnitude of the expected values."""
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (err_msg, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()) if expected.size else 1.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def ref_pads(padding, in_hw, kernel, stride, dilation=(1, 1)):
    """Independent padding resolution: TF/lax SAME puts the extra pixel at the end."""
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        pads = []
        for n, k, s, d in zip(in_hw, kernel, stride, dilation, strict=True):
            k_eff = d * (k - 1) + 1
            out = -(-n // s)
            total = max((out - 1) * s + k_eff - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(tuple(p) for p in padding)


def ref_conv(x, w, b, stride, pads, dilation, groups):
    """Direct cross-correlation in float64: loops over output positions, taps and groups."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    w = np.asarray(w, np.float64)
    (sh, sw), (dh, dw) = stride, dilation
    bsz, hp, wp, c = x.shape
    kh, kw, cg, o = w.shape
    og = o // groups
    ho = (hp - (dh * (kh - 1) + 1)) // sh + 1
    wo = (wp - (dw * (kw - 1) + 1)) // sw + 1
    y = np.zeros((bsz, ho, wo, o))
    for p in range(ho):
        for q in range(wo):
            for i in range(kh):
                for j in range(kw):
                    pix = x[:, p * sh + i * dh, q * sw + j * dw, :]
                    for g in range(groups):
                        y[:, p, q, g * og : (g + 1) * og] += (
                            pix[:, g * cg : (g + 1) * cg] @ w[i, j, :, g * og : (g + 1) * og]
                        )
    if b is not None:
        y += np.asarray(b, np.float64)
    return y


def ref_conv_vjp(x, w, g_out, stride, pads, dilation, groups):
    """Adjoint of ref_conv: gradients of sum(y * g_out) w.r.t. x, w and b."""
    x64 = np.asarray(x, np.float64)
    xp = np.pad(x64, ((0, 0), pads[0], pads[1], (0, 0)))
    w = np.asarray(w, np.float64)
    g_out = np.asarray(g_out, np.float64)
    (sh, sw), (dh, dw) = stride, dilation
    kh, kw, cg, o = w.shape
    og = o // groups
    _, ho, wo, _ = g_out.shape
    dxp, dw_ = np.zeros_like(xp), np.zeros_like(w)
    for p in range(ho):
        for q in range(wo):
            for i in range(kh):
                for j in range(kw):
                    r, s = p * sh + i * dh, q * sw + j * dw
                    for g in range(groups):
                        cs, os_ = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
                        dxp[:, r, s, cs] += g_out[:, p, q, os_] @ w[i, j, :, os_].T
                        dw_[i, j, :, os_] += xp[:, r, s, cs].T @ g_out[:, p, q, os_]
    h, wd = x64.shape[1:3]
    dx = dxp[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + wd, :]
    return dx, dw_, g_out.sum(axis=(0, 1, 2))


def lax_padding(padding):
    """The padding spelled for lax directly (strings pass through: an independent SAME)."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return padding


def lax_conv(x, w, b, stride, padding, dilation, groups):
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=_pair(stride),
        padding=lax_padding(padding),
        rhs_dilation=_pair(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
    return y + b.reshape(1, 1, 1, -1)


# ----------------------------------------------------------------------------- the conv grid
X_SHAPE = (2, 9, 8, 4)
KERNELS = [(1, 1), (2, 2), (3, 3), (5, 5), (3, 1)]
STRIDES = [1, 2, 3, (1, 2)]
PADDINGS = ["VALID", "SAME", 1, ((1, 2), (0, 1))]
DILATIONS = [1, 2]
GROUPS = [1, 2, 4]  # 4 == C: depthwise


def _fits(kernel, stride, padding, dilation):
    st, dil = _pair(stride), _pair(dilation)
    pads = ref_pads(padding, X_SHAPE[1:3], kernel, st, dil)
    return all(
        n + lo + hi >= d * (k - 1) + 1
        for n, (lo, hi), k, d in zip(X_SHAPE[1:3], pads, kernel, dil, strict=True)
    )


FULL_GRID = [
    combo
    for combo in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS, GROUPS)
    if _fits(*combo[:4])
]
GRID = random.Random(1234).sample(FULL_GRID, 40)


def _grid_id(combo):
    k, s, p, d, g = combo
    return f"k{k[0]}x{k[1]}-s{s}-p{p}-d{d}-g{g}".replace(" ", "")


def test_grid_covers_every_value():
    for axis, values in enumerate([KERNELS, STRIDES, PADDINGS, DILATIONS, GROUPS]):
        seen = [c[axis] for c in GRID]
        for v in values:
            assert v in seen, (axis, v)
    assert len(FULL_GRID) > 300  # the filter keeps most of the product


def _conv_inputs(kernel, groups, seed=0, x_shape=X_SHAPE, out_ch=8):
    c = x_shape[3]
    x = _rand(seed, x_shape)
    w = _rand(seed + 1, (*kernel, c // groups, out_ch), 0.5)
    b = _rand(seed + 2, (out_ch,))
    return x, w, b


def _applicable_impls(kernel, out_hw, stride=1, groups=1):
    impls = ["auto", "xla", "im2col"]
    if _pair(stride) == (1, 1) and groups == 1:
        impls.append("direct")
    if tuple(kernel) == (1, 1):
        impls.append("pointwise")
    if tuple(out_hw) == (1, 1):
        impls.append("dense")
    return impls


def _values_and_grads(fn, x, w, b, g_seed=99):
    y, vjp = jax.vjp(fn, x, w, b)
    g = _rand(g_seed, y.shape)
    return y, g, vjp(jnp.asarray(g))


@pytest.mark.parametrize("combo", GRID, ids=_grid_id)
def test_conv2d_values_and_grads_vs_numpy_loops(combo):
    kernel, stride, padding, dilation, groups = combo
    x, w, b = _conv_inputs(kernel, groups)
    st, dil = _pair(stride), _pair(dilation)
    pads = ref_pads(padding, X_SHAPE[1:3], kernel, st, dil)

    def f(x, w, b):
        return layers.conv2d(
            x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups
        )

    y, g, (dx, dw, db) = _values_and_grads(jax.jit(f), x, w, b)
    y_ref = ref_conv(x, w, b, st, pads, dil, groups)
    assert_close(y, y_ref, err_msg="values")
    dx_ref, dw_ref, db_ref = ref_conv_vjp(x, w, g, st, pads, dil, groups)
    assert_close(dx, dx_ref, err_msg="dx")
    assert_close(dw, dw_ref, err_msg="dw")
    assert_close(db, db_ref, err_msg="db")


def _check_impls_equal_lax(x, w, b, stride, padding, dilation, groups, impls):
    """Every impl in `impls` equals lax.conv_general_dilated, values and VJP, in one jit."""

    def all_impls(x, w, b, g):
        def run(fn):
            y, vjp = jax.vjp(fn, x, w, b)
            return (y, *vjp(g))

        outs = {
            "lax": run(lambda x, w, b: lax_conv(x, w, b, stride, padding, dilation, groups)),
        }
        for impl in impls:
            outs[impl] = run(
                lambda x, w, b, impl=impl: layers.conv2d(
                    x,
                    w,
                    b,
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                    groups=groups,
                    impl=impl,
                )
            )
        return outs

    y_shape = jax.eval_shape(
        lambda: lax_conv(
            jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), stride, padding, dilation, groups
        )
    ).shape
    g = _rand(7, y_shape)
    outs = jax.jit(all_impls)(x, w, b, g)
    expected = outs.pop("lax")
    assert set(outs) == set(impls)
    for impl, got in outs.items():
        for name, a, e in zip(("y", "dx", "dw", "db"), got, expected, strict=True):
            assert_close(a, e, err_msg=f"impl={impl} {name}")
    return expected[0]


# im2col compiles slowly (one slice per tap): a third of the grid keeps the file fast.
@pytest.mark.parametrize("combo", GRID[::3], ids=_grid_id)
def test_every_applicable_impl_equals_lax(combo):
    kernel, stride, padding, dilation, groups = combo
    x, w, b = _conv_inputs(kernel, groups, seed=3)
    out_hw = layers.conv2d_shape(
        X_SHAPE, w.shape, stride=stride, padding=padding, dilation=dilation
    )[1:3]
    _check_impls_equal_lax(
        x,
        w,
        b,
        stride,
        padding,
        dilation,
        groups,
        _applicable_impls(kernel, out_hw, stride, groups),
    )


DIRECT_GRID = [c for c in FULL_GRID if c[1] == 1 and c[4] == 1]


@pytest.mark.parametrize("combo", DIRECT_GRID, ids=_grid_id)
def test_direct_impl_equals_lax(combo):
    """Every kernel, padding (also wider than the kernel) and dilation the grid has at stride 1."""
    kernel, stride, padding, dilation, groups = combo
    x, w, b = _conv_inputs(kernel, groups, seed=11)
    _check_impls_equal_lax(x, w, b, stride, padding, dilation, groups, ["direct"])


def _native_applies(combo) -> bool:
    kernel, stride, padding, dilation, groups = combo
    pads = ref_pads(padding, X_SHAPE[1:3], kernel, _pair(stride), _pair(dilation))
    return native.supports(
        kernel, X_SHAPE[3], 8, _pair(stride), _pair(dilation), groups, pads, jnp.float32
    )


NATIVE_GRID = [c for c in FULL_GRID if _native_applies(c)]


@pytest.mark.parametrize("combo", NATIVE_GRID, ids=_grid_id)
def test_native_impl_equals_lax_and_auto_picks_it_on_cpu(combo):
    kernel, stride, padding, dilation, groups = combo
    x, w, b = _conv_inputs(kernel, groups, seed=13)
    _check_impls_equal_lax(x, w, b, stride, padding, dilation, groups, ["native"])
    pads = ref_pads(padding, X_SHAPE[1:3], kernel, (1, 1))
    out_hw = layers.conv2d_shape(X_SHAPE, w.shape, padding=padding)[1:3]
    chosen = layers.choose_conv_impl(
        X_SHAPE[1:3], kernel, (1, 1), pads, (1, 1), out_hw, "cpu", channels=(4, 8)
    )
    full_cover = tuple(kernel) == X_SHAPE[1:3] and pads == ((0, 0), (0, 0))
    assert chosen == ("dense" if out_hw == (1, 1) and not full_cover else "native")


def test_native_grid_covers_kernels_and_paddings():
    assert {c[0] for c in NATIVE_GRID} == set(KERNELS)
    assert {str(c[2]) for c in NATIVE_GRID} == {str(p) for p in PADDINGS}


def test_direct_grid_has_wide_padding_and_dilation():
    assert len(DIRECT_GRID) >= 30
    wide = [c for c in DIRECT_GRID if c[0] == (2, 2) and c[2] == ((1, 2), (0, 1))]
    assert wide and {c[3] for c in DIRECT_GRID} == {1, 2}


def test_direct_backward_uses_only_nhwc_hwio_convolutions():
    """The point of impl='direct': no transposed dimension labels, even inside a scan."""
    x, w, _ = _conv_inputs((3, 3), 1)

    def loss(x, w):
        return jnp.sum(layers.conv2d(x, w, padding=1, dilation=2, impl="direct") ** 2)

    def body(xw, _):
        dx, dw = jax.grad(loss, argnums=(0, 1))(*xw)
        return (xw[0] - 0.1 * dx, xw[1] - 0.1 * dw), None

    text = str(jax.make_jaxpr(lambda xw: jax.lax.scan(body, xw, None, length=2))((x, w)))
    specs = re.findall(
        r"conv_general_dilated\[[^\]]*?dimension_numbers=(ConvDimensionNumbers\((?:[^()]|\([^)]*\))*\))",
        text,
    )
    canonical = str(lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC")))
    assert len(specs) == 3, specs  # forward, input gradient, kernel gradient
    assert all(spec == canonical for spec in specs), specs
    # And XLA keeps them so: every convolution it compiles is NHWC/HWIO -> NHWC.
    hlo = jax.jit(lambda xw: jax.lax.scan(body, xw, None, length=2)[0]).lower((x, w))
    labels = re.findall(r"convolution\(.*?dim_labels=([\w>-]+)", hlo.compile().as_text())
    assert labels and set(labels) == {"b01f_01io->b01f"}, labels


def test_direct_is_reverse_mode_only():
    x, w, _ = _conv_inputs((3, 3), 1)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda w: layers.conv2d(x, w, impl="direct"), (w,), (w,))


DENSE_CASES = [
    # (x_shape, w_shape, stride, padding, dilation, groups)
    ((2, 26, 26, 10), (26, 26, 10, 10), 1, "VALID", 1, 1),  # the course's last conv
    ((2, 5, 5, 4), (3, 3, 4, 6), 1, "VALID", 2, 1),  # dilated kernel covers the input
    ((2, 3, 3, 4), (5, 5, 4, 6), 1, 1, 1, 1),  # padding makes the input as big as the kernel
    ((2, 4, 4, 4), (4, 4, 2, 6), 1, "VALID", 1, 2),  # grouped
    ((2, 4, 4, 4), (4, 4, 1, 4), 1, "VALID", 1, 4),  # depthwise
    ((2, 6, 5, 4), (3, 3, 4, 2), 4, "VALID", 1, 1),  # 1x1 output through the stride
    ((1, 3, 4, 4), (4, 6, 4, 3), 1, ((1, 0), (1, 1)), 1, 1),  # asymmetric padding
    ((2, 1, 1, 4), (3, 3, 4, 5), 1, "SAME", 1, 1),  # SAME on a single pixel
    ((2, 3, 2, 4), (2, 2, 2, 4), 1, ((0, 1), (1, 1)), 3, 2),  # dilation + groups + pads
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=[f"dense{i}" for i in range(len(DENSE_CASES))])
def test_dense_impl_equals_lax(case):
    x_shape, w_shape, stride, padding, dilation, groups = case
    assert layers.conv2d_shape(x_shape, w_shape, stride=stride, padding=padding, dilation=dilation)[
        1:3
    ] == (1, 1)
    x = _rand(0, x_shape)
    w = _rand(1, w_shape, 0.2)
    b = _rand(2, w_shape[3:])
    impls = ["dense", "auto", "xla"] + (["pointwise"] if w_shape[:2] == (1, 1) else [])
    if w_shape[0] * w_shape[1] <= 25:  # im2col's compile time grows with the number of taps
        impls.append("im2col")
    _check_impls_equal_lax(x, w, b, stride, padding, dilation, groups, impls)


POINTWISE_CASES = [
    # (stride, padding, groups)
    (1, "VALID", 1),
    (2, "SAME", 2),
    ((1, 2), 1, 4),
    (3, ((1, 2), (0, 1)), 2),
    (2, 1, 1),
    ((1, 2), "SAME", 1),
    (3, "VALID", 4),
    (1, ((1, 2), (0, 1)), 4),
]


@pytest.mark.parametrize("case", POINTWISE_CASES, ids=str)
def test_pointwise_impl_equals_lax(case):
    stride, padding, groups = case
    x, w, b = _conv_inputs((1, 1), groups, seed=5, out_ch=8)
    _check_impls_equal_lax(
        x, w, b, stride, padding, 1, groups, ["pointwise", "auto", "xla", "im2col"]
    )


def test_pointwise_cases_cover_strides_paddings_groups():
    for axis, n in ((0, 4), (1, 4), (2, 3)):
        assert len({str(c[axis]) for c in POINTWISE_CASES}) == n


def test_auto_picks_the_specialised_lowering():
    valid = ((0, 0), (0, 0))
    choose = layers.choose_conv_impl
    assert choose((26, 26), (26, 26), (1, 1), valid, (1, 1), (1, 1), "cpu") == "dense"
    full = choose((26, 26), (26, 26), (1, 1), valid, (1, 1), (1, 1), "cpu", channels=(10, 10))
    assert full == "native"  # native.dense
    padded = ((1, 1), (1, 1))
    assert (
        choose((24, 24), (26, 26), (1, 1), padded, (1, 1), (1, 1), "cpu", channels=(10, 10))
        == "dense"
    )
    assert (
        choose((26, 26), (26, 26), (1, 1), valid, (1, 1), (1, 1), "cpu", channels=(10, 33))
        == "dense"
    )
    assert choose((8, 8), (1, 1), (1, 1), valid, (1, 1), (8, 8), "cpu") == "pointwise"
    assert choose((8, 8), (3, 3), (1, 1), valid, (1, 1), (6, 6), "cpu") == "im2col"
    assert choose((28, 28), (9, 9), (1, 1), valid, (1, 1), (20, 20), "cpu") == "xla"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_keeps_xla_convolutions_on_accelerators(backend):
    valid = ((0, 0), (0, 0))
    choose = layers.choose_conv_impl
    assert choose((26, 26), (26, 26), (1, 1), valid, (1, 1), (1, 1), backend) == "dense"
    full = choose((26, 26), (26, 26), (1, 1), valid, (1, 1), (1, 1), backend, channels=(10, 10))
    assert full == "dense"
    assert choose((8, 8), (1, 1), (1, 1), valid, (1, 1), (8, 8), backend) == "pointwise"
    assert choose((8, 8), (3, 3), (1, 1), valid, (1, 1), (6, 6), backend) == "xla"


def test_impl_that_does_not_apply_raises():
    x = jnp.ones((1, 6, 6, 2))
    with pytest.raises(ValueError, match=r"impl='direct' needs stride 1 and groups=1"):
        layers.conv2d(x, jnp.ones((3, 3, 2, 4)), stride=2, impl="direct")
    with pytest.raises(ValueError, match=r"impl='direct' needs stride 1 and groups=1"):
        layers.conv2d(x, jnp.ones((3, 3, 1, 4)), groups=2, impl="direct")
    with pytest.raises(ValueError, match=r"impl='pointwise' needs a 1x1 kernel, got \(3, 3\)"):
        layers.conv2d(x, jnp.ones((3, 3, 2, 4)), impl="pointwise")
    with pytest.raises(ValueError, match=r"impl='dense' needs .*1x1 output.*\(4, 4\)"):
        layers.conv2d(x, jnp.ones((3, 3, 2, 4)), impl="dense")
    with pytest.raises(ValueError, match=r"impl='dense'"):
        layers.conv2d(x, jnp.ones((1, 1, 2, 4)), impl="dense")


def test_unknown_impl_raises_naming_the_valid_ones():
    with pytest.raises(ValueError, match="unknown impl 'fft'") as info:
        layers.conv2d(jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4)), impl="fft")
    for impl in layers.CONV_IMPLS:
        assert impl in str(info.value)
    assert set(layers.CONV_IMPLS) == {
        "auto",
        "xla",
        "dense",
        "pointwise",
        "im2col",
        "direct",
        "native",
    }


def test_conv2d_without_bias_and_unbatched_padding_forms():
    x, w, b = _conv_inputs((3, 3), 1)
    y = layers.conv2d(x, w, None, padding=(1, 2))
    y_ref = ref_conv(x, w, None, (1, 1), ((1, 1), (2, 2)), (1, 1), 1)
    assert_close(y, y_ref)
    # padding spellings that mean the same thing agree
    y0 = layers.conv2d(x, w, b, padding=0)
    y1 = layers.conv2d(x, w, b, padding="valid")
    y2 = layers.conv2d(x, w, b, padding=((0, 0), (0, 0)))
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(y0, y2)


# ----------------------------------------------------------------------------- shape functions
def test_conv2d_shape_matches_conv2d_over_full_grid():
    bad = []
    for kernel, stride, padding, dilation, groups in FULL_GRID:
        x = jax.ShapeDtypeStruct(X_SHAPE, jnp.float32)
        w = jax.ShapeDtypeStruct((*kernel, X_SHAPE[3] // groups, 8), jnp.float32)
        predicted = layers.conv2d_shape(
            X_SHAPE, w.shape, stride=stride, padding=padding, dilation=dilation
        )
        # im2col's shapes are checked by the value tests; tracing it 400 times is slow
        impls = [
            i for i in _applicable_impls(kernel, predicted[1:3], stride, groups) if i != "im2col"
        ]
        for impl in impls:
            got = jax.eval_shape(
                lambda x, w, impl=impl, s=stride, p=padding, d=dilation, g=groups: layers.conv2d(
                    x, w, stride=s, padding=p, dilation=d, groups=g, impl=impl
                ),
                x,
                w,
            ).shape
            if got != predicted:
                bad.append((kernel, stride, padding, dilation, groups, impl, got, predicted))
    assert not bad, bad[:5]


POOL_GRID = list(itertools.product([2, 3, (2, 3)], [None, 1, 2, 3], ["VALID", "SAME", 1]))


def test_pool_shape_matches_pools():
    bad = []
    for x_shape in [(2, 7, 8, 3), (1, 9, 9, 2), (1, 3, 3, 1)]:
        x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
        for window, stride, padding in POOL_GRID:
            predicted = layers.pool_shape(x_shape, window, stride, padding)
            for fn in (layers.max_pool, layers.avg_pool):
                got = jax.eval_shape(
                    lambda x, fn=fn, a=(window, stride, padding): fn(x, *a), x
                ).shape
                if got != predicted:
                    bad.append((fn.__name__, x_shape, window, stride, padding, got, predicted))
    assert not bad, bad[:5]


# ----------------------------------------------------------------------------- pooling
def ref_pool(x, window, stride, pads, kind, count_include_pad=True):
    """Loop reference for max/avg pooling; returns (y, vjp(g))."""
    x = np.asarray(x, np.float64)
    (kh, kw), (sh, sw) = window, stride
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=fill)
    real = np.pad(np.ones(x.shape[1:3]), pads, constant_values=0.0)
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for p in range(ho):
        for q in range(wo):
            win = xp[:, p * sh : p * sh + kh, q * sw : q * sw + kw, :]
            if kind == "max":
                y[:, p, q] = win.max(axis=(1, 2))
            else:
                n = (
                    kh * kw
                    if count_include_pad
                    else real[p * sh : p * sh + kh, q * sw : q * sw + kw].sum()
                )
                y[:, p, q] = win.sum(axis=(1, 2)) / n

    def vjp(g):
        g = np.asarray(g, np.float64)
        dxp = np.zeros_like(xp)
        for p in range(ho):
            for q in range(wo):
                rs, cs = slice(p * sh, p * sh + kh), slice(q * sw, q * sw + kw)
                if kind == "max":
                    win = xp[:, rs, cs, :]
                    hit = win == win.max(axis=(1, 2), keepdims=True)
                    dxp[:, rs, cs, :] += hit * g[:, p, q][:, None, None, :]
                else:
                    n = kh * kw if count_include_pad else real[rs, cs].sum()
                    dxp[:, rs, cs, :] += g[:, p, q][:, None, None, :] / n
        h, w = x.shape[1:3]
        return dxp[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w]

    return y, vjp


def _tie_free(seed, shape):
    """Distinct values (a permutation), so max pooling has a unique argmax everywhere."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n).reshape(shape) / n - 0.5).astype(np.float32)


POOL_REF_GRID = list(itertools.product([2, 3], [1, 2, 3], ["VALID", "SAME", 1]))


@pytest.mark.parametrize("window,stride,padding", POOL_REF_GRID, ids=str)
def test_pools_vs_numpy_loops(window, stride, padding):
    x = _tie_free(0, (2, 7, 8, 3))
    win, st = _pair(window), _pair(stride)
    pads = ref_pads(padding, x.shape[1:3], win, st)
    kinds = {
        "max": (lambda x: layers.max_pool(x, window, stride, padding), "max", True),
        "avg_incl": (lambda x: layers.avg_pool(x, window, stride, padding), "avg", True),
        "avg_excl": (
            lambda x: layers.avg_pool(x, window, stride, padding, count_include_pad=False),
            "avg",
            False,
        ),
    }
    refs = {k: ref_pool(x, win, st, pads, kind, incl) for k, (_, kind, incl) in kinds.items()}
    gs = {k: _rand(1, y_ref.shape) for k, (y_ref, _) in refs.items()}

    ys = jax.jit(lambda x: {k: fn(x) for k, (fn, _, _) in kinds.items()})(x)
    for k, y in ys.items():
        assert_close(y, refs[k][0], err_msg=f"{k} values")

    # Gradients under jit: the way a training step takes them.
    @jax.jit
    def grads(x, gs):
        return {k: jax.vjp(fn, x)[1](gs[k])[0] for k, (fn, _, _) in kinds.items()}

    for k, dx in grads(x, gs).items():
        assert_close(dx, refs[k][1](gs[k]), err_msg=f"{k} grad")


def test_avg_pool_count_include_pad_differs_only_at_borders():
    x = _rand(0, (1, 4, 4, 1)) + 3.0
    incl = layers.avg_pool(x, 3, 1, 1, count_include_pad=True)
    excl = layers.avg_pool(x, 3, 1, 1, count_include_pad=False)
    np.testing.assert_allclose(incl[:, 1:-1, 1:-1], excl[:, 1:-1, 1:-1], rtol=1e-6)
    # the corner window sees 4 real pixels out of 9
    np.testing.assert_allclose(excl[0, 0, 0, 0], x[0, :2, :2, 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(incl[0, 0, 0, 0], x[0, :2, :2, 0].sum() / 9, rtol=1e-6)


TILING_CASES = [((1, 8, 8, 2), 2), ((2, 7, 7, 3), 2), ((1, 9, 9, 1), 3), ((2, 7, 6, 2), (2, 3))]


@pytest.mark.parametrize("x_shape,window", TILING_CASES, ids=str)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_tiling_pool_path_equals_reduce_window(x_shape, window, kind):
    x = _tie_free(3, x_shape)
    win = _pair(window)
    dims, strides = (1, *win, 1), (1, *win, 1)
    if kind == "max":

        def ours(x):
            return layers.max_pool(x, window)

        def ref(x):
            return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, "VALID")
    else:

        def ours(x):
            return layers.avg_pool(x, window, window, 0)

        def ref(x):
            return lax.reduce_window(x, 0.0, lax.add, dims, strides, "VALID") / (win[0] * win[1])

    y, vjp = jax.vjp(ours, x)
    y_ref, vjp_ref = jax.vjp(ref, x)
    expected_hw = (x_shape[1] // win[0], x_shape[2] // win[1])  # floor: the ragged edge is dropped
    assert y.shape == (x_shape[0], *expected_hw, x_shape[3])
    assert_close(y, y_ref, rtol=1e-6)
    g = jnp.asarray(_rand(4, y.shape))
    assert_close(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6)


def test_tiling_max_pool_derivative_follows_the_first_maximum():
    """Ties (common after a ReLU) send the whole derivative to the first maximum, row-major,
    as lax.reduce_window does (and PyTorch), in reverse and in forward mode."""
    x = np.zeros((2, 6, 6, 3), np.float32)
    x[0, 0, 1, 0] = 1.0  # one strict maximum in a window of zeros
    x[1, 2:4, 2:4, 1] = 5.0  # a window of four equal values
    x[1, 4, 5, 2] = x[1, 5, 4, 2] = 2.0  # two equal maxima: the one in the upper row wins

    def ref(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    g = _rand(14, (2, 3, 3, 3))
    _, vjp = jax.vjp(lambda x: layers.max_pool(x, 2), x)
    _, vjp_ref = jax.vjp(ref, x)
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
    assert vjp(g)[0][1, 2, 2, 1] == g[1, 1, 1, 1] and vjp(g)[0][1, 3, 3, 1] == 0
    assert vjp(g)[0][1, 4, 5, 2] == g[1, 2, 2, 2] and vjp(g)[0][1, 5, 4, 2] == 0
    t = _rand(15, x.shape)
    _, jvp_out = jax.jvp(lambda x: layers.max_pool(x, 2), (x,), (t,))
    _, jvp_ref = jax.jvp(ref, (x,), (t,))
    np.testing.assert_array_equal(jvp_out, jvp_ref)


def test_global_avg_pool():
    x = _rand(0, (2, 5, 3, 4))
    y = layers.global_avg_pool(x)
    assert y.shape == (2, 4)
    assert_close(y, x.astype(np.float64).mean(axis=(1, 2)), rtol=1e-6)


# ----------------------------------------------------------------------------- batch norm
def _bn_params(c, seed=0):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    mean = rng.standard_normal(c).astype(np.float32)
    var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return scale, bias, mean, var


def test_batch_norm_train_normalizes_and_updates_running_stats():
    x = _rand(0, (4, 5, 6, 3), 3.0) + np.array([10.0, -2.0, 0.5], np.float32)
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    _, _, run_mean, run_var = _bn_params(3)
    y, new_mean, new_var = layers.batch_norm(
        x, ones, zeros, run_mean, run_var, train=True, momentum=0.8
    )
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, atol=1e-4)
    x64 = x.astype(np.float64)
    batch_mean, batch_var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    np.testing.assert_allclose(new_mean, 0.8 * run_mean + 0.2 * batch_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_var, 0.8 * run_var + 0.2 * batch_var, rtol=1e-4, atol=1e-5)


def test_batch_norm_train_with_scale_and_bias_matches_formula():
    x = _rand(1, (3, 4, 4, 5), 2.0) + 1.0
    scale, bias, run_mean, run_var = _bn_params(5, seed=1)
    y, _, _ = layers.batch_norm(x, scale, bias, run_mean, run_var, train=True, eps=1e-3)
    x64 = x.astype(np.float64)
    m, v = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    assert_close(y, scale * (x64 - m) / np.sqrt(v + 1e-3) + bias)


def test_batch_norm_eval_uses_running_stats_and_returns_them_unchanged():
    x = _rand(2, (2, 3, 3, 4))
    scale, bias, run_mean, run_var = _bn_params(4, seed=2)
    y, new_mean, new_var = layers.batch_norm(x, scale, bias, run_mean, run_var, train=False)
    expected = scale * (x.astype(np.float64) - run_mean) / np.sqrt(run_var + 1e-5) + bias
    assert_close(y, expected)
    np.testing.assert_array_equal(new_mean, run_mean)
    np.testing.assert_array_equal(new_var, run_var)


@pytest.mark.parametrize("rank", [2, 4])
def test_batch_norm_mask_excludes_rows_exactly(rank):
    shape = (5, 3) if rank == 2 else (5, 3, 2, 3)
    x = _rand(3, shape)
    mask = np.array([1, 0, 1, 1, 0], np.float32)
    x[mask == 0] = 100.0 + _rand(4, x[mask == 0].shape)  # junk that must not leak in
    kept = mask == 1
    scale, bias, run_mean, run_var = _bn_params(3, seed=3)
    y, m, v = layers.batch_norm(x, scale, bias, run_mean, run_var, train=True, mask_B=mask)
    y_sub, m_sub, v_sub = layers.batch_norm(x[kept], scale, bias, run_mean, run_var, train=True)
    np.testing.assert_allclose(np.asarray(y)[kept], y_sub, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m, m_sub, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, v_sub, rtol=1e-5, atol=1e-6)
    # an all-ones mask is the same as no mask
    y_all, _, _ = layers.batch_norm(
        x, scale, bias, run_mean, run_var, train=True, mask_B=np.ones(5, np.float32)
    )
    y_none, _, _ = layers.batch_norm(x, scale, bias, run_mean, run_var, train=True)
    np.testing.assert_allclose(y_all, y_none, rtol=1e-5, atol=1e-5)


def test_batch_norm_rank2_normalizes_columns():
    x = _rand(5, (16, 3), 2.0) + np.array([1.0, -3.0, 7.0], np.float32)
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, _, _ = layers.batch_norm(x, ones, zeros, zeros, ones, train=True)
    assert y.shape == (16, 3)
    np.testing.assert_allclose(np.mean(y, axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.var(np.asarray(y, np.float64), axis=0), 1.0, atol=1e-4)


def test_batch_norm_gradients_are_finite_and_shift_invariant():
    x = _rand(6, (2, 3, 3, 4))
    scale, bias, run_mean, run_var = _bn_params(4, seed=6)
    g = jnp.asarray(_rand(7, x.shape))

    def loss(x, scale, bias, g):
        y, _, _ = layers.batch_norm(x, scale, bias, run_mean, run_var, train=True)
        return jnp.sum(y * g)

    grads = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias, g)
    for gr in grads:
        assert np.all(np.isfinite(gr))
    # sum(y) does not depend on x in train mode: the normalized values sum to zero
    dx_sum = jax.grad(loss)(x, scale, bias, jnp.ones_like(g))
    np.testing.assert_allclose(dx_sum, 0.0, atol=1e-4)
    # a constant channel has zero variance: finite output equal to the bias
    xc = x.copy()
    xc[..., 0] = 3.0
    y, _, var = layers.batch_norm(xc, scale, bias, run_mean, run_var, train=True, momentum=0.0)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(np.asarray(y)[..., 0], bias[0], atol=1e-3)
    assert np.all(np.asarray(var) >= 0)
    assert np.all(np.isfinite(jax.grad(loss)(xc, scale, bias, g)))


def _bn_autodiff(x, scale, bias, mask, eps):
    """The batch-norm formulas as plain jnp, for autodiff: (y, batch mean, batch var)."""
    axes = tuple(range(x.ndim - 1))
    c = x.shape[-1]
    if mask is None:
        w = jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    else:
        w = jnp.asarray(mask, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    count = jnp.maximum(jnp.sum(w) * (x.size // x.shape[0] // c), 1)
    mean = jnp.sum(x * w, axis=axes) / count
    var = jnp.maximum(jnp.sum(x * x * w, axis=axes) / count - mean * mean, 0)
    inv = lax.rsqrt(var + eps) * scale
    shape = (1,) * (x.ndim - 1) + (c,)
    return x * inv.reshape(shape) + (bias - mean * inv).reshape(shape), mean, var


@pytest.mark.parametrize(
    "shape,mask",
    [
        ((4, 5, 6, 3), None),
        ((5, 3, 2, 3), [1, 0, 1, 1, 0]),
        ((16, 3), None),
        ((5, 3), [0, 1, 1, 0, 1]),
    ],
    ids=str,
)
def test_batch_norm_backward_equals_autodiff(shape, mask):
    x = _rand(11, shape, 2.0) + 0.5
    x[..., 1] = 0.0  # a constant channel: zero variance, jnp.maximum's tie derivative
    scale, bias, _, _ = _bn_params(shape[-1], seed=11)
    mask = None if mask is None else np.asarray(mask, np.float32)
    cts = tuple(_rand(12 + i, s) for i, s in enumerate((shape, shape[-1:], shape[-1:])))

    def ours(x, scale, bias):
        return layers._batch_norm_train(x, scale, bias, mask, None, 1e-5)

    def ref(x, scale, bias):
        return _bn_autodiff(x, scale, bias, mask, 1e-5)

    out, vjp = jax.vjp(ours, x, scale, bias)
    grads = vjp(cts)
    with jax.enable_x64(True):  # float64 autodiff: float32's rounding would dominate at var 0
        f64 = [np.asarray(a, np.float64) for a in (x, scale, bias)]
        out_ref, vjp_ref = jax.vjp(ref, *f64)
        grads_ref = vjp_ref(tuple(np.asarray(c, np.float64) for c in cts))
    for a, b in zip(out, out_ref, strict=True):
        assert_close(a, b, rtol=1e-5)
    for name, a, b in zip(("x", "scale", "bias"), grads, grads_ref, strict=True):
        assert_close(a, b, rtol=1e-4, err_msg=name)


def test_batch_norm_mask_gets_no_gradient_and_may_be_bool():
    x = _rand(13, (4, 2, 2, 3))
    scale, bias, run_mean, run_var = _bn_params(3, seed=13)

    def loss(x, mask):
        y, _, _ = layers.batch_norm(x, scale, bias, run_mean, run_var, train=True, mask_B=mask)
        return jnp.sum(y * y * y)

    bool_mask = np.array([True, False, True, True])
    g_bool = jax.grad(loss)(x, bool_mask)
    g_mask = jax.grad(loss, argnums=1)(x, bool_mask.astype(np.float32))
    assert_close(g_bool, jax.grad(loss)(x, bool_mask.astype(np.float32)))
    np.testing.assert_array_equal(g_mask, 0.0)


# ----------------------------------------------------------------------------- dropout
def test_dropout_rate_is_the_drop_probability():
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (1000, 1000)).astype(np.float32))
    y = np.asarray(layers.dropout(jax.random.PRNGKey(0), x, 0.25))
    dropped = y == 0
    assert abs(dropped.mean() - 0.25) < 0.003  # ~7 standard deviations
    np.testing.assert_allclose(y[~dropped], np.asarray(x)[~dropped] / 0.75, rtol=1e-6)
    assert abs(y.mean() / float(x.mean()) - 1.0) < 0.01
    assert y.dtype == np.float32


def test_dropout_identity_zero_and_errors():
    x = jnp.asarray(_rand(0, (4, 5)))
    key = jax.random.PRNGKey(1)
    np.testing.assert_array_equal(layers.dropout(key, x, 0.0), x)
    np.testing.assert_array_equal(layers.dropout(key, x, 0.7, deterministic=True), x)
    np.testing.assert_array_equal(layers.dropout(key, x, 1.0), np.zeros((4, 5), np.float32))
    for rate in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout: rate"):
            layers.dropout(key, x, rate)


def test_dropout_is_deterministic_per_key():
    x = jnp.ones((64, 64))
    a = layers.dropout(jax.random.PRNGKey(3), x, 0.5)
    b = layers.dropout(jax.random.PRNGKey(3), x, 0.5)
    c = layers.dropout(jax.random.PRNGKey(4), x, 0.5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------- initializers
HWIO = (3, 3, 16, 32)
FAN_IN, FAN_OUT = 3 * 3 * 16, 3 * 3 * 32
EXPECTED_VAR = {
    "he_normal": 2.0 / FAN_IN,
    "he_uniform": 2.0 / FAN_IN,
    "glorot_normal": 2.0 / (FAN_IN + FAN_OUT),
    "glorot_uniform": 2.0 / (FAN_IN + FAN_OUT),
    "lecun_normal": 1.0 / FAN_IN,
    "lecun_uniform": 1.0 / FAN_IN,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_VAR))
def test_initializer_variance(name):
    init = layers.initializer(name)
    assert init is layers.INITIALIZERS[name] is getattr(layers, name)
    w = np.asarray(init(jax.random.PRNGKey(0), HWIO, jnp.float32), np.float64)
    assert w.shape == HWIO
    var = EXPECTED_VAR[name]
    assert abs(w.var() / var - 1.0) < 0.1, (w.var(), var)  # n=4608: ~5 standard deviations
    assert abs(w.mean()) < 5 * np.sqrt(var / w.size)
    if name.endswith("uniform"):
        assert np.abs(w).max() <= np.sqrt(3 * var) * (1 + 1e-6)
        # a uniform fills its range: the largest |w| is close to the bound
        assert np.abs(w).max() > 0.99 * np.sqrt(3 * var)


def test_initializer_zeros_ones_callable_and_unknown():
    np.testing.assert_array_equal(layers.initializer("zeros")(None, (2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(layers.initializer("ones")(None, (2, 3)), np.ones((2, 3)))

    def custom(key, shape, dtype=jnp.float32):
        return jnp.full(shape, 0.5, dtype)

    assert layers.initializer(custom) is custom
    with pytest.raises(ValueError, match="unknown initializer 'he'") as info:
        layers.initializer("he")
    for name in layers.INITIALIZERS:
        assert name in str(info.value)


# ----------------------------------------------------------------------------- checks
def _raises_assert(*fragments):
    return pytest.raises(AssertionError, match=".*".join(re.escape(f) for f in fragments))


def test_conv2d_shape_asserts():
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    with _raises_assert("conv2d: input x must be NHWC (rank 4), got shape (8, 8, 4)"):
        layers.conv2d(jnp.ones((8, 8, 4)), w)
    with _raises_assert("conv2d: kernel w must be HWIO (rank 4), got shape (3, 4, 6)"):
        layers.conv2d(x, jnp.ones((3, 4, 6)))
    with _raises_assert("conv2d: input channels of x (2, 8, 8, 4)", "= 3 x 1", "(3, 3, 3, 6)"):
        layers.conv2d(x, jnp.ones((3, 3, 3, 6)))
    with _raises_assert("conv2d: input channels of x (2, 8, 8, 4)", "= 4 x 2", "(3, 3, 4, 6)"):
        layers.conv2d(x, w, groups=2)
    with _raises_assert("conv2d: groups=3 must divide the input channels (4)", "(3, 3, 1, 6)"):
        layers.conv2d(x, jnp.ones((3, 3, 1, 6)), groups=3)
    with _raises_assert("conv2d: groups=2", "output channels (5)"):
        layers.conv2d(x, jnp.ones((3, 3, 2, 5)), groups=2)
    with _raises_assert(
        "conv2d: the dilated kernel of extent (9, 9) is larger than the padded input",
        "(2, 8, 8, 4)",
    ):
        layers.conv2d(x, jnp.ones((5, 5, 4, 6)), dilation=2)
    with _raises_assert("conv2d: bias must have shape (6,), got (4,)"):
        layers.conv2d(x, w, jnp.ones(4))


def test_pool_and_norm_shape_asserts():
    with _raises_assert("max_pool: the pooling window of extent (3, 3) is larger", "(1, 2, 2, 1)"):
        layers.max_pool(jnp.ones((1, 2, 2, 1)), 3)
    with _raises_assert("avg_pool: the pooling window of extent (4, 4) is larger", "(1, 3, 3, 1)"):
        layers.avg_pool(jnp.ones((1, 3, 3, 1)), 4, padding="VALID")
    with _raises_assert("max_pool: input must be NHWC (rank 4), got shape (4, 4, 1)"):
        layers.max_pool(jnp.ones((4, 4, 1)), 2)
    with _raises_assert("avg_pool: input must be NHWC (rank 4), got shape (1, 4, 4, 1, 1)"):
        layers.avg_pool(jnp.ones((1, 4, 4, 1, 1)), 2)
    with _raises_assert("global_avg_pool: input must be NHWC (rank 4), got (2, 3)"):
        layers.global_avg_pool(jnp.ones((2, 3)))
    c4, c3 = jnp.ones(4), jnp.ones(3)
    x = jnp.ones((2, 3, 3, 4))
    with _raises_assert("batch_norm: scale, bias, mean and var must have shape (4,)"):
        layers.batch_norm(x, c4, c4, c3, c4, train=False)
    with _raises_assert("batch_norm: input must be (B, C) or NHWC"):
        layers.batch_norm(jnp.ones((2, 3, 4)), c4, c4, c4, c4, train=True)
    with _raises_assert("batch_norm: mask must have shape (2,)"):
        layers.batch_norm(x, c4, c4, c4, c4, train=True, mask_B=jnp.ones(3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"stride": 0}, "stride must be >= 1"),
        ({"stride": (1, -1)}, "stride must be >= 1"),
        ({"stride": 1.5}, "stride must be an int or a pair"),
        ({"dilation": 0}, "dilation must be >= 1"),
        ({"padding": "FULL"}, "padding string must be 'VALID' or 'SAME'"),
        ({"padding": -1}, "padding must be non-negative"),
        ({"padding": ((0, -1), (0, 0))}, "padding must be non-negative"),
        ({"padding": (1, 2, 3)}, "padding must be 'VALID', 'SAME', an int"),
        ({"padding": ((1, 2), (3,))}, "padding must be 'VALID', 'SAME', an int"),
        ({"padding": 1.0}, "padding must be 'VALID', 'SAME', an int"),
        ({"groups": 0}, "groups must be a positive int"),
    ],
    ids=str,
)
def test_conv2d_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        layers.conv2d(jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2)), **kwargs)


@pytest.mark.parametrize("fn", [layers.max_pool, layers.avg_pool])
def test_pool_bad_arguments_raise_value_error(fn):
    x = jnp.ones((1, 6, 6, 2))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        fn(x, 2, 0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        fn(x, 0)
    with pytest.raises(ValueError, match="padding string"):
        fn(x, 2, 2, "same-ish")
    with pytest.raises(ValueError, match="non-negative"):
        fn(x, 2, 2, -1)
    with pytest.raises(ValueError, match="padding must be 'VALID'"):
        fn(x, 2, 2, ((1,), (1,)))


# ----------------------------------------------------------------------------- tracing
def test_conv_and_pool_do_not_retrace_on_same_shapes():
    def step(x, w, b):
        y = layers.conv2d(x, w, b, padding="SAME")
        y = layers.max_pool(y, 2)
        y, _, _ = layers.batch_norm(
            y, jnp.ones(4), jnp.zeros(4), jnp.zeros(4), jnp.ones(4), train=True
        )
        return layers.global_avg_pool(y)

    f = jax.jit(chex.assert_max_traces(step, n=1))
    for seed in range(3):
        x, w, b = _rand(seed, (2, 8, 8, 3)), _rand(seed + 10, (3, 3, 3, 4)), _rand(seed, (4,))
        assert f(x, w, b).shape == (2, 4)
    with pytest.raises(AssertionError, match="trace"):
        f(_rand(0, (2, 10, 10, 3)), w, b)  # a new shape needs a second trace


def test_batch_norm_with_the_layer_befores_sums_equals_without():
    """sums_B2C (as conv2d(stats=True) gives them) change nothing but where the sums come from."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((6, 5, 4, 3)).astype(np.float32) + 1.5)
    scale, bias = jnp.asarray([1.5, -0.5, 2.0]), jnp.asarray([0.1, 0.2, -0.3])
    mean, var = jnp.zeros(3), jnp.ones(3)
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    sums = jnp.stack([jnp.sum(x, axis=(1, 2)), jnp.sum(x * x, axis=(1, 2))], axis=1)
    g = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))

    def run(with_sums, mask_B):
        def f(x, scale, bias):
            y, m, v = layers.batch_norm(
                x, scale, bias, mean, var, train=True, mask_B=mask_B,
                sums_B2C=sums if with_sums else None,
            )  # fmt: skip
            return jnp.sum(y * g) + jnp.sum(m) + 2 * jnp.sum(v), (y, m, v)

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)

    for mask_B in (None, mask):
        chex.assert_trees_all_close(run(True, mask_B), run(False, mask_B), rtol=2e-5, atol=2e-5)
    with pytest.raises(AssertionError, match=r"sums must have shape \(6, 2, 3\)"):
        layers.batch_norm(x, scale, bias, mean, var, train=True, sums_B2C=sums[:, :1])


@pytest.mark.parametrize(
    "shape,window,masked",
    [((5, 12, 12, 16), 2, True), ((3, 9, 7, 8), 2, False), ((2, 10, 11, 24), (3, 2), True)],
    ids=["tiny's", "odd-sizes", "3x2-24-channels"],
)
def test_batch_norm_max_pool_native_equals_the_two_layers(shape, window, masked):
    """Values, gradients in x, scale and bias, and running statistics; a negative scale (the
    pool then takes each window's smallest x), ties, and rows and columns past the windows."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, :2, :2, 0] = 1.25  # a tied window
    x = jnp.asarray(x)
    c = shape[-1]
    scale = jnp.asarray(rng.uniform(0.5, 2.0, c).astype(np.float32)).at[0].set(-1.5)
    bias = jnp.asarray(rng.standard_normal(c).astype(np.float32))
    mean, var = jnp.zeros(c), jnp.ones(c)
    mask = jnp.asarray((np.arange(shape[0]) != 1).astype(np.float32)) if masked else None
    sums = jnp.stack([jnp.sum(x, axis=(1, 2)), jnp.sum(x * x, axis=(1, 2))], axis=1)
    g_shape = layers.pool_shape(shape, window, window, 0)
    g = jnp.asarray(rng.standard_normal(g_shape).astype(np.float32))

    def run(impl, with_sums):
        def f(x, scale, bias):
            y, m, v = layers.batch_norm_max_pool(
                x, scale, bias, mean, var, window, train=True, mask_B=mask, impl=impl,
                sums_B2C=sums if with_sums else None,
            )  # fmt: skip
            return jnp.sum(y * g) + jnp.sum(m) + 2 * jnp.sum(v), (y, m, v)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)

    want = run("xla", False)
    for with_sums in (False, True):
        chex.assert_trees_all_close(run("native", with_sums), want, rtol=3e-5, atol=3e-5)


def test_batch_norm_max_pool_picks_and_refuses():
    x = jnp.ones((2, 4, 4, 3))
    c3 = jnp.ones(3)
    y, m, v = layers.batch_norm_max_pool(x, c3, c3, c3, c3, 2, train=False)  # eval: two layers
    np.testing.assert_array_equal(
        y, layers.max_pool(layers.batch_norm(x, c3, c3, c3, c3, train=False)[0], 2)
    )
    for train in (False, True):  # eval, or 3 channels
        with pytest.raises(ValueError, match="impl='native' needs train=True, float32, 8, 16"):
            layers.batch_norm_max_pool(x, c3, c3, c3, c3, 2, train=train, impl="native")
    with pytest.raises(ValueError, match="impl must be auto, native or xla"):
        layers.batch_norm_max_pool(x, c3, c3, c3, c3, 2, train=True, impl="direct")


@pytest.mark.parametrize(
    "x_shape,k,c_out,padding,window,masked,bias",
    [
        ((4, 26, 26, 8), 3, 16, "VALID", 2, True, True),  # tiny's 24x24 layer (Winograd)
        ((3, 11, 9, 10), 3, 8, 1, 2, False, False),  # padded; a row, a column past the windows
        ((2, 12, 12, 4), 1, 24, "VALID", (3, 2), True, True),
    ],
)
def test_conv2d_batch_norm_max_pool_equals_the_layers(
    x_shape, k, c_out, padding, window, masked, bias
):
    """Values, running statistics and gradients in x, w, b, scale and bias: the same bits as
    the native layers one after another, and lax's within float32 rounding; a negative scale."""
    rng = np.random.default_rng(32)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(0.3 * rng.standard_normal((k, k, x_shape[3], c_out)), jnp.float32)
    b = jnp.asarray(0.1 * rng.standard_normal(c_out), jnp.float32) if bias else None
    scale = jnp.asarray(rng.uniform(0.5, 2.0, c_out), jnp.float32).at[0].set(-1.5)
    shift = jnp.asarray(0.1 * rng.standard_normal(c_out), jnp.float32)
    mean, var = jnp.zeros(c_out), jnp.ones(c_out)
    mask = jnp.asarray(np.arange(x_shape[0]) != 1, jnp.float32) if masked else None

    def loss(fused, impl="auto"):
        def f(x, w, b, scale, shift):
            if fused:
                y, m, v = layers.conv2d_batch_norm_max_pool(
                    x, w, b, scale, shift, mean, var, window, padding=padding, train=True,
                    mask_B=mask,
                )  # fmt: skip
            else:
                a, sums = layers.conv2d(
                    x, w, b, padding=padding, impl=impl, activation="relu", stats=True
                )
                y, m, v = layers.batch_norm_max_pool(
                    a, scale, shift, mean, var, window, train=True, mask_B=mask, sums_B2C=sums,
                    impl="native" if impl == "auto" else "xla",
                )  # fmt: skip
            return jnp.sum(jnp.sin(y)) + jnp.sum(m * v), (y, m, v)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

    args = (x, w, b, scale, shift)
    text = loss(True).lower(*args).as_text()
    assert "cnn_conv_pool_grads" in text and "cnn_bn_pool_grad" not in text  # not written
    got = loss(True)(*args)
    chex.assert_trees_all_equal(got, loss(False)(*args))
    want_all = jax.tree.leaves(loss(False, "xla")(*args))
    for g, want in zip(jax.tree.leaves(got), want_all, strict=True):
        scale = max(1.0, float(jnp.abs(want).max()))  # dw sums 2,304 products per tap
        np.testing.assert_allclose(g, want, rtol=3e-5, atol=3e-5 * scale)


def test_conv2d_batch_norm_max_pool_runs_the_layers_where_it_cannot_fuse():
    """Evaluation, another lowering, or channels the native pool does not take: the layers one
    after another, with the same results."""
    rng = np.random.default_rng(33)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    for c_out, train, impl in ((8, False, "auto"), (8, True, "direct"), (5, True, "auto")):
        w = jnp.asarray(rng.standard_normal((3, 3, 3, c_out)), jnp.float32)
        ones, zeros = jnp.ones(c_out), jnp.zeros(c_out)
        got = layers.conv2d_batch_norm_max_pool(
            x, w, None, ones, zeros, zeros, ones, 2, train=train, impl=impl
        )
        a = layers.conv2d(x, w, impl=impl, activation="relu")
        y, m, v = layers.batch_norm(a, ones, zeros, zeros, ones, train=train)
        chex.assert_trees_all_close(got, (layers.max_pool(y, 2), m, v), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        layers.conv2d_batch_norm_max_pool(x, w, None, ones, zeros, zeros, ones, 2, train=True,
                                          impl="fast")  # fmt: skip


@pytest.mark.parametrize(
    "x_shape,k,c_mid,c_out,padding,bias",
    [
        ((4, 28, 28, 1), 3, 32, 10, "VALID", True),  # the eip net's first two layers
        ((3, 9, 11, 4), 3, 16, 16, 1, False),  # Winograd, padded, the 1x1 gradient not swapped
    ],
)
def test_conv2d_relu_conv1x1_equals_the_layers(x_shape, k, c_mid, c_out, padding, bias):
    """Values and gradients in x, both kernels and both biases: the same bits as conv2d twice
    (native), and lax's within float32 rounding; two native calls forward and backward."""
    rng = np.random.default_rng(34)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(0.3 * rng.standard_normal((k, k, x_shape[3], c_mid)), jnp.float32)
    w2 = jnp.asarray(0.3 * rng.standard_normal((1, 1, c_mid, c_out)), jnp.float32)
    b, b2 = (
        (jnp.asarray(0.1 * rng.standard_normal(n), jnp.float32) for n in (c_mid, c_out))
        if bias
        else (None, None)
    )

    def loss(fused, impl="auto"):
        def f(x, w, b, w2, b2):
            if fused:
                y = layers.conv2d_relu_conv1x1(x, w, b, w2, b2, padding=padding)
            else:
                a = layers.conv2d(x, w, b, padding=padding, impl=impl, activation="relu")
                y = layers.conv2d(a, w2, b2, impl=impl, activation="relu")
            return jnp.sum(jnp.sin(y)), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

    args = (x, w, b, w2, b2)
    text = loss(True).lower(*args).as_text()
    assert text.count("cnn_conv_pw_grads") == 2 and "cnn_conv_dw" not in text
    got = loss(True)(*args)
    chex.assert_trees_all_equal(got, loss(False)(*args))
    want_all = jax.tree.leaves(loss(False, "xla")(*args))
    for g, want in zip(jax.tree.leaves(got), want_all, strict=True):
        scale = max(1.0, float(jnp.abs(want).max()))
        np.testing.assert_allclose(g, want, rtol=3e-5, atol=3e-5 * scale)


def test_conv2d_relu_conv1x1_runs_the_layers_where_it_cannot_fuse():
    """Another lowering, channels between that the native call does not take (not 8, 16, 24 or
    32), or a 1x1 whose output is 1x1 (a dense layer): conv2d twice, the same results; a
    kernel that is not 1x1 by the conv's outputs is refused."""
    rng = np.random.default_rng(35)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    for c_mid, impl, k in ((8, "im2col", 3), (12, "auto", 3), (8, "auto", 8)):
        w = jnp.asarray(rng.standard_normal((k, k, 3, c_mid)), jnp.float32)
        w2 = jnp.asarray(rng.standard_normal((1, 1, c_mid, 5)), jnp.float32)
        f = functools.partial(layers.conv2d_relu_conv1x1, impl=impl)
        text = jax.jit(f).lower(x, w, None, w2, None).as_text()
        assert "cnn_conv_pw" not in text
        a = layers.conv2d(x, w, impl=impl, activation="relu")
        want = layers.conv2d(a, w2, impl=impl, activation="relu")
        chex.assert_trees_all_equal(f(x, w, None, w2, None), want)
    with pytest.raises(ValueError, match=r"w1x1 must be a 1x1 HWIO kernel \(1, 1, 8, N\)"):
        layers.conv2d_relu_conv1x1(x, w, None, jnp.ones((1, 1, 7, 5)), None)
    with pytest.raises(ValueError, match=r"b1x1 must have shape \(5,\)"):
        layers.conv2d_relu_conv1x1(x, w, None, w2, jnp.ones(4))
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        layers.conv2d_relu_conv1x1(x, w, None, w2, None, impl="fast")


# ------------------------------------------------------------------- batch norm as an affine map
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(stride=(2, 1), dilation=2), dict(padding=1)],
    ids=["valid", "strided", "padded"],
)
@pytest.mark.parametrize("bias", [False, True])
def test_fold_affine_is_the_conv_of_the_affine_map_without_padding(kw, bias):
    rng = np.random.default_rng(31)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(5), jnp.float32) if bias else None
    inv, shift = (jnp.asarray(rng.standard_normal(3), jnp.float32) for _ in range(2))
    want = layers.conv2d(
        x * inv.reshape(1, 1, 1, 3) + shift.reshape(1, 1, 1, 3), w, b, impl="xla", **kw
    )
    got = layers.conv2d(x, *layers.fold_affine(w, b, inv, shift), impl="xla", **kw)
    if "padding" in kw:  # the border taps read padding zeros, which are not x * inv + shift
        assert not np.allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[:, 1:-1, 1:-1], want[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_sums", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_affine_is_batch_norm(train, with_sums):
    """x * inv + shift equals batch_norm(x), with the same running statistics and gradients
    (through the sums, when given, else through x)."""
    rng = np.random.default_rng(32)
    x = jnp.asarray(rng.standard_normal((5, 4, 4, 3)) * 2 + 1, jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal(3), jnp.float32) for _ in range(2))
    mean, var = jnp.asarray([0.1, -0.2, 0.3]), jnp.asarray([1.5, 0.5, 2.0])
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0])
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def sums(x):
        return jnp.stack([jnp.sum(x, axis=(1, 2)), jnp.sum(x * x, axis=(1, 2))], axis=1)

    def affine(x, scale, bias):
        s = sums(x) if with_sums else None
        inv, shift, m, v = layers.batch_norm_affine(
            x, scale, bias, mean, var, train=train, mask_B=mask, sums_B2C=s
        )
        y = x * inv.reshape(1, 1, 1, -1) + shift.reshape(1, 1, 1, -1)
        return jnp.sum(y * g), (y, m, v)

    def plain(x, scale, bias):
        y, m, v = layers.batch_norm(x, scale, bias, mean, var, train=train, mask_B=mask)
        return jnp.sum(y * g), (y, m, v)

    got = jax.jit(jax.value_and_grad(affine, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
    want = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
