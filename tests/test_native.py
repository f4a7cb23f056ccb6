"""The native C++ convolution: equal to lax.conv_general_dilated, and clear when it cannot run."""

from __future__ import annotations

import subprocess

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn import layers, native

DN = ("NHWC", "HWIO", "NHWC")


def _rand(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _lax_conv(x, w, pads):
    return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN)


def _assert_close(actual, expected, what: str):
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=2e-5, atol=2e-5 * scale, err_msg=what
    )


def _assert_outputs_close(got_all, want_all):
    """(y, dx, dw, db) against the reference's; a None (no bias) on both sides."""
    for what, got, want in zip(("y", "dx", "dw", "db"), got_all, want_all, strict=True):
        if want is None:
            assert got is None, what
        else:
            _assert_close(got, want, what)


@pytest.fixture(autouse=True)
def _native_loaded():
    """Every test here needs the library; a build failure fails loudly, it is never skipped."""
    assert native.unavailable_reason() is None, native.unavailable_reason()
    yield
    native._load.cache_clear()  # a test that changed the environment must not leak its result
    assert native.unavailable_reason() is None


# (batch, height, width, c_in, kernel (kh, kw), c_out, pads): every vector count (1-4 of 8
# lanes), ragged channel counts, widths that leave every column-block tail, one input channel,
# asymmetric and full (k - 1) padding, a batch of 7 shared among the threads, and the shapes of
# the configs' layers. 3x3 kernels with an even output and 4-16 input channels (either way)
# run Winograd F(2x2, 3x3): tiles of 2x2 outputs, blocks of them spanning rows (8x4 below);
# so do their kernel gradients with 8 or 16 input channels (16x16 in 5x5 tiles: blocks end
# mid-row; 8 -> 5: a ragged vector).
CASES = [
    (1, 5, 5, 1, (3, 3), 1, ((0, 0), (0, 0))),
    (3, 7, 9, 1, (3, 3), 8, ((0, 0), (0, 0))),
    (7, 12, 12, 10, (3, 3), 16, ((0, 0), (0, 0))),
    (2, 10, 10, 16, (3, 3), 16, ((1, 1), (1, 1))),
    (2, 9, 11, 5, (3, 3), 10, ((2, 2), (2, 2))),
    (2, 6, 6, 3, (5, 5), 13, ((1, 3), (0, 4))),
    (2, 8, 31, 17, (2, 3), 24, ((1, 0), (2, 1))),
    (2, 13, 13, 8, (3, 3), 32, ((0, 0), (0, 0))),
    (2, 9, 9, 32, (3, 3), 32, ((1, 1), (1, 1))),
    (3, 12, 12, 16, (1, 1), 10, ((0, 0), (0, 0))),
    (5, 26, 26, 32, (1, 1), 10, ((0, 0), (0, 0))),
    (2, 7, 5, 32, (1, 1), 1, ((0, 0), (0, 0))),
    (1, 6, 6, 2, (6, 6), 3, ((0, 0), (0, 0))),
    (4, 28, 28, 1, (3, 3), 8, ((0, 0), (0, 0))),
    (4, 26, 26, 8, (3, 3), 16, ((0, 0), (0, 0))),
    (3, 8, 6, 4, (3, 3), 12, ((1, 1), (0, 0))),
    (3, 6, 8, 8, (3, 3), 5, ((1, 1), (0, 0))),
]


@pytest.mark.parametrize("bias,relu", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}-o{c[5]}"
)
def test_values_and_all_gradients_equal_lax(case, bias, relu):
    """act(conv(x, w) + b) and its gradients in x, w and b, against lax and autodiff."""
    b, h, w_, c, kernel, o, pads = case
    x = _rand(0, (b, h, w_, c))
    w = _rand(1, (*kernel, c, o))
    bias_O = _rand(3, (o,)) if bias else None
    assert native.supports(kernel, c, o, (1, 1), (1, 1), 1, pads, jnp.float32)

    def reference(x, w, b_O):
        y = _lax_conv(x, w, pads) + (0 if b_O is None else b_O.reshape(1, 1, 1, -1))
        return jax.nn.relu(y) if relu else y

    def both(x, w, b_O, g):
        out = {}
        for name, fn in (
            ("native", lambda x, w, b_O: native.conv(x, w, pads, b_O, relu=relu)),
            ("lax", reference),
        ):
            y, vjp = jax.vjp(fn, x, w, b_O)
            out[name] = (y, *vjp(g))
        return out

    y_shape = jax.eval_shape(lambda: _lax_conv(x, w, pads)).shape
    outs = jax.jit(both)(x, w, bias_O, _rand(2, y_shape))
    if relu and outs["lax"][0].size >= 16:  # the mask is exercised: some outputs are cut
        assert 0.2 < float(np.mean(np.asarray(outs["lax"][0]) == 0)) < 0.8
    _assert_outputs_close(outs["native"], outs["lax"])


def test_conv2d_impl_native_with_bias_and_padding_forms():
    x, w, bias = _rand(3, (2, 11, 10, 6)), _rand(4, (3, 3, 6, 12)), _rand(5, (12,))
    for padding, lax_padding in (
        ("VALID", "VALID"),
        ("SAME", "SAME"),
        (1, ((1, 1), (1, 1))),
        (((2, 0), (1, 2)), ((2, 0), (1, 2))),
    ):
        y = layers.conv2d(x, w, bias, padding=padding, impl="native")
        ref = lax.conv_general_dilated(x, w, (1, 1), lax_padding, dimension_numbers=DN)
        _assert_close(y, ref + bias.reshape(1, 1, 1, -1), f"padding={padding}")


def test_auto_picks_native_on_cpu_where_it_applies():
    valid = ((0, 0), (0, 0))

    def choose(kernel, channels, pads=valid, stride=(1, 1), dilation=(1, 1), groups=1, **kw):
        return layers.choose_conv_impl(
            (12, 12), kernel, stride, pads, dilation, (10, 10), "cpu",
            channels=channels, groups=groups, **kw,
        )  # fmt: skip

    assert choose((3, 3), (8, 16)) == "native"
    assert choose((1, 1), (16, 10)) == "native"
    assert choose((3, 3), (8, 64)) == "im2col"  # too many output channels
    assert choose((3, 3), (64, 8)) == "im2col"  # the input gradient would have 64 outputs
    assert choose((3, 3), (8, 16), stride=(2, 2)) == "im2col"
    assert choose((3, 3), (8, 16), dilation=(2, 1)) == "im2col"
    assert choose((3, 3), (8, 16), groups=2) == "im2col"
    assert choose((3, 3), (8, 16), pads=((3, 3), (0, 0))) == "im2col"  # wider than k - 1
    assert choose((3, 3), (8, 16), dtype=jnp.bfloat16) == "im2col"
    assert choose((3, 3), None) == "im2col"  # channels unknown
    assert choose((9, 9), (8, 16)) == "xla"  # 81 taps: the input gradient's zero border dominates
    full = layers.choose_conv_impl(
        (26, 26), (26, 26), (1, 1), valid, (1, 1), (1, 1), "cpu", channels=(10, 10)
    )
    assert full == "native"  # native.dense
    got = layers.choose_conv_impl(
        (8, 8), (3, 3), (1, 1), valid, (1, 1), (6, 6), "gpu", channels=(8, 16)
    )
    assert got == "xla"


def test_impl_native_that_does_not_apply_raises_naming_the_limits():
    x = jnp.ones((1, 8, 8, 4))
    cases = [
        (dict(w=jnp.ones((3, 3, 4, 33))), r"channels \(4, 33\)"),
        (dict(w=jnp.ones((3, 3, 4, 8)), stride=2), r"stride \(2, 2\)"),
        (dict(w=jnp.ones((3, 3, 4, 8)), dilation=2), r"dilation \(2, 2\)"),
        (dict(w=jnp.ones((3, 3, 2, 8)), groups=2), r"groups=2"),
        (dict(w=jnp.ones((3, 3, 4, 8)), padding=3), r"padding \(\(3, 3\), \(3, 3\)\)"),
    ]
    for kw, pattern in cases:
        w = kw.pop("w")
        with pytest.raises(ValueError, match=r"impl='native' needs float32.*" + pattern):
            layers.conv2d(x, w, impl="native", **kw)
    with pytest.raises(ValueError, match=r"impl='native' needs float32.*bfloat16"):
        layers.conv2d(x.astype(jnp.bfloat16), jnp.ones((3, 3, 4, 8), jnp.bfloat16), impl="native")


def test_vmap_and_scan_and_no_retrace():
    x, w = _rand(6, (3, 2, 9, 9, 4)), _rand(7, (3, 3, 4, 8))
    pads = ((1, 1), (1, 1))
    got = jax.vmap(lambda x: native.conv(x, w, pads))(x)
    want = jax.vmap(lambda x: _lax_conv(x, w, pads))(x)
    _assert_close(got, want, "vmap")

    def loss(w, x):
        return jnp.sum(native.conv(x, w, pads) ** 2)

    @jax.jit
    def descend(w, xs):
        return lax.scan(lambda w, x: (w - 1e-4 * jax.grad(loss)(w, x), None), w, xs)[0]

    def descend_lax(w, xs):
        for x in xs:
            w = w - 1e-4 * jax.grad(lambda w, x: jnp.sum(_lax_conv(x, w, pads) ** 2))(w, x)
        return w

    _assert_close(descend(w, x), descend_lax(jnp.asarray(w), x), "scan of gradient steps")


def test_forward_mode_is_refused_like_any_custom_vjp():
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda w: native.conv(x, w, ((0, 0), (0, 0))), (w,), (w,))


def test_disabled_by_environment_falls_back_and_explains(monkeypatch):
    monkeypatch.setenv("CNN_NATIVE", "0")
    native._load.cache_clear()
    assert "CNN_NATIVE=0" in native.unavailable_reason()
    valid = ((0, 0), (0, 0))
    pick = layers.choose_conv_impl(
        (8, 8), (3, 3), (1, 1), valid, (1, 1), (6, 6), "cpu", channels=(4, 8)
    )
    assert pick == "im2col"
    with pytest.raises(
        native.NativeError, match=r"unavailable: disabled by CNN_NATIVE=0.*impl='auto'"
    ):
        layers.conv2d(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 8)), impl="native")
    # the fused layers fall back to XLA's: the same calls give the unfused results
    x, c8 = jnp.asarray(_rand(17, (2, 6, 6, 8))), jnp.ones(8)
    y, sums = layers.conv2d(x, jnp.asarray(_rand(18, (3, 3, 8, 8))), activation="relu", stats=True)
    assert sums is None and float(jnp.min(y)) == 0.0
    got = layers.batch_norm_max_pool(y, c8, c8, c8, c8, 2, train=True)
    want = layers.batch_norm_max_pool(y, c8, c8, c8, c8, 2, train=True, impl="xla")
    chex.assert_trees_all_equal(got, want)
    with pytest.raises(native.NativeError, match="unavailable: disabled by CNN_NATIVE=0"):
        layers.batch_norm_max_pool(y, c8, c8, c8, c8, 2, train=True, impl="native")


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    native._load.cache_clear()
    assert native.compiler() is None
    assert "no C++ compiler found" in native.unavailable_reason()


def test_failed_build_reports_the_compiler_error_and_leaves_no_file(monkeypatch, tmp_path):
    bad = tmp_path / "bad-cxx"
    bad.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo bad 1.0; exit 0; fi\n"
                   "echo 'conv.cc:1: error: no' >&2; exit 1\n")  # fmt: skip
    bad.chmod(0o755)
    monkeypatch.setenv("CXX", str(bad))
    monkeypatch.setenv("CNN_CACHE_DIR", str(tmp_path / "cache"))
    native._load.cache_clear()
    reason = native.unavailable_reason()
    assert "compiling conv.cc failed" in reason and "error: no" in reason
    assert not list((tmp_path / "cache" / "native").iterdir())  # no library, no temp file


def test_build_goes_to_the_cache_keyed_by_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CNN_CACHE_DIR", str(tmp_path))
    cxx = native.compiler()
    path = native.library_path(cxx)
    assert path.parent == tmp_path / "native" and not path.exists()
    native.build(cxx, path)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]
    assert native.library_path(cxx) == path  # stable: a second process reuses it
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another CPU")
    assert native.library_path(cxx) != path


def test_source_compiles_without_warnings_under_wall():
    """The kernel's own code (not XLA's headers) is warning-free with the build's flags."""
    flags = [f for f in native.FLAGS if f not in ("-w", "-shared", "-fPIC")]
    cmd = [native.compiler(), *flags, "-fsyntax-only", "-Wall", "-Wextra",
           f"-isystem{jax.ffi.include_dir()}", str(native.SOURCE)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "conv.cc" not in done.stderr, done.stderr[-3000:]


def test_kernel_and_bias_gradients_are_the_same_bits_every_time():
    """Partial sums per fixed group of images: no dependence on which thread took which."""
    x, g = _rand(8, (37, 12, 12, 8)), _rand(9, (37, 10, 10, 16))
    w, b = _rand(10, (3, 3, 8, 16)), _rand(11, (16,))

    @jax.jit
    def grads(x, g):
        _, vjp = jax.vjp(lambda w, b: native.conv(x, w, ((0, 0), (0, 0)), b, relu=True), w, b)
        return vjp(g)

    first = [np.asarray(a) for a in grads(x, g)]
    for _ in range(30):
        for got, want in zip(grads(x + 0.0, g), first, strict=True):
            np.testing.assert_array_equal(np.asarray(got), want)


# (batch, height, width, c_in, c_out): a kernel that covers the input, as native.dense. K =
# h * w * c_in spans one to several chunks of 512 with tails; batches leave every row-block
# tail; outputs 1-32, ragged and whole vectors; more than 32 channels in.
DENSE_CASES = [
    (32, 26, 26, 10, 10),  # eip_session1_original's last layer
    (1, 1, 1, 1, 1),
    (7, 3, 5, 2, 17),
    (13, 4, 4, 64, 32),
    (9, 23, 23, 3, 8),
    (25, 2, 2, 129, 24),
]


@pytest.mark.parametrize("bias,relu", [(False, False), (True, True)])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_dense_values_and_gradients_equal_lax(case, bias, relu):
    b, h, w_, c, o = case
    x, w = _rand(20, (b, h, w_, c)), _rand(21, (h, w_, c, o))
    bias_O = _rand(22, (o,)) if bias else None
    valid = ((0, 0), (0, 0))
    assert native.supports_dense((h, w_), (h, w_), o, (1, 1), 1, valid, jnp.float32)
    act = "relu" if relu else None

    def both(x, w, b_O, g):
        out = {}
        for impl in ("native", "xla"):
            fn = lambda x, w, b_O: layers.conv2d(x, w, b_O, impl=impl, activation=act)  # noqa: B023,E731
            y, vjp = jax.vjp(fn, x, w, b_O)
            out[impl] = (y, *vjp(g))
        return out

    outs = jax.jit(both)(x, w, bias_O, _rand(23, (b, 1, 1, o)))
    hlo = jax.jit(lambda x, w: layers.conv2d(x, w, impl="native")).lower(x, w).as_text()
    assert "cnn_dense" in hlo and "cnn_conv" not in hlo
    _assert_outputs_close(outs["native"], outs["xla"])


def test_dense_is_the_same_bits_every_time():
    """Partial sums per fixed chunk of K, added in chunk order: no dependence on the threads."""
    x, w, g = _rand(24, (32, 6760)), _rand(25, (6760, 10)), _rand(26, (32, 10))

    @jax.jit
    def all_three(x, w):
        y, vjp = jax.vjp(native.dense, x, w)
        return (y, *vjp(g))

    first = [np.asarray(a) for a in all_three(x, w)]
    for _ in range(20):
        for got, want in zip(all_three(x + 0.0, w), first, strict=True):
            np.testing.assert_array_equal(np.asarray(got), want)


def test_dense_limits():
    valid = ((0, 0), (0, 0))
    assert native.supports_dense((5, 5), (5, 5), 32, (1, 1), 1, valid, jnp.float32)
    assert not native.supports_dense((5, 5), (5, 5), 33, (1, 1), 1, valid, jnp.float32)
    assert not native.supports_dense((5, 5), (6, 6), 8, (1, 1), 1, valid, jnp.float32)
    assert not native.supports_dense((5, 5), (5, 5), 8, (1, 1), 1, ((0, 1), (0, 0)), jnp.float32)
    assert not native.supports_dense((5, 5), (5, 5), 8, (1, 1), 2, valid, jnp.float32)
    assert not native.supports_dense((5, 5), (5, 5), 8, (1, 1), 1, valid, jnp.bfloat16)
    assert not native.supports_dense((3, 3), (5, 5), 8, (2, 2), 1, valid, jnp.float32)
    with pytest.raises(ValueError, match=r"impl='native' needs.*channels \(4, 33\)"):
        layers.conv2d(jnp.ones((2, 5, 5, 4)), jnp.ones((5, 5, 4, 33)), impl="native")


def test_swap_dw_picks_the_side_with_fewer_wasted_lanes():
    no_pad = ((0, 0), (0, 0))
    assert native._swap_dw((1, 1), no_pad, 32, 10)  # eip_session1's 1x1: 40 against 64 lanes
    assert native._swap_dw((1, 1), no_pad, 16, 10)
    assert not native._swap_dw((1, 1), no_pad, 10, 32)
    assert not native._swap_dw((1, 1), no_pad, 16, 16)
    assert not native._swap_dw((3, 3), no_pad, 32, 10)  # the swap holds for 1x1 kernels only
    assert not native._swap_dw((1, 1), ((1, 0), (0, 0)), 32, 10)


@pytest.mark.parametrize("bias,relu", [(False, False), (True, True)])
def test_swapped_kernel_gradient_is_the_same_bits(monkeypatch, bias, relu):
    """x and g swapped sum the same products in the same order: dw and db bit for bit."""
    x, g = _rand(12, (9, 7, 6, 32)), _rand(13, (9, 7, 6, 10))
    w, b = _rand(14, (1, 1, 32, 10)), _rand(15, (10,)) if bias else None

    def grads(x, w, b, g):
        _, vjp = jax.vjp(lambda x, w, b: native.conv(x, w, ((0, 0), (0, 0)), b, relu=relu), x, w, b)
        return vjp(g)

    swapped = [np.asarray(a) for a in jax.jit(grads)(x, w, b, g) if a is not None]
    monkeypatch.setattr(native, "_swap_dw", lambda *args: False)
    plain = [np.asarray(a) for a in jax.jit(grads)(x, w, b, g) if a is not None]
    assert len(plain) == (3 if bias else 2)
    for got, want in zip(swapped, plain, strict=True):
        np.testing.assert_array_equal(got, want)


def test_swap_refuses_a_kernel_other_than_1x1():
    x, g = _rand(16, (2, 6, 6, 4)), _rand(17, (2, 4, 4, 8))
    call = jax.ffi.ffi_call(
        "cnn_conv_dw",
        (jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.float32)),
        vmap_method="sequential",
    )
    pads = native._pad_attrs(((0, 0), (0, 0)))
    with pytest.raises(Exception, match="swap needs a 1x1 kernel"):
        call(x, g, x, x, **pads, mask=False, bias=False, swap=True, terms=False)


def test_terms_refused_without_the_mask_or_shaped_otherwise():
    """The sums' cotangent terms are added where the relu's mask is read: none without it."""
    x, w, m = _rand(16, (2, 6, 6, 4)), _rand(17, (3, 3, 4, 8)), _rand(18, (2, 6, 6, 4))
    out = (jax.ShapeDtypeStruct((2, 4, 4, 8), jnp.float32), jax.ShapeDtypeStruct((0,), jnp.float32))
    call = jax.ffi.ffi_call("cnn_conv", out, vmap_method="sequential")
    pads = native._pad_attrs(((0, 0), (0, 0)))
    b = jnp.zeros(8, jnp.float32)
    flags = dict(relu=False, stats=False, terms=True)
    with pytest.raises(Exception, match="terms need the mask"):
        call(x, w, b, m, _rand(19, (2, 2, 4)), **pads, mask=False, **flags)
    with pytest.raises(Exception, match="terms need the mask"):
        call(x, w, b, m, _rand(19, (2, 2, 3)), **pads, mask=True, **flags)


@pytest.mark.parametrize(
    "x_shape,w_shape,pads",
    [
        ((5, 9, 9, 4), (3, 3, 4, 12), ((1, 0), (0, 1))),
        ((5, 10, 10, 8), (3, 3, 8, 16), ((1, 1), (1, 1))),  # Winograd, both ways
        ((5, 6, 6, 32), (1, 1, 32, 10), ((0, 0), (0, 0))),  # kernel gradient swapped
    ],
)
@pytest.mark.parametrize("relu", [False, True])
def test_stats_are_each_images_sums_and_differentiable(relu, x_shape, w_shape, pads):
    """stats=True: per image and channel, sum y and sum y*y; their cotangents reach x, w, b
    (with a relu, added by the kernels as they read g)."""
    x, w, b = _rand(12, x_shape), _rand(13, w_shape), _rand(14, w_shape[3:])

    def reference(x, w, b):
        y = _lax_conv(x, w, pads) + b.reshape(1, 1, 1, -1)
        y = jax.nn.relu(y) if relu else y
        return y, jnp.stack([jnp.sum(y, axis=(1, 2)), jnp.sum(y * y, axis=(1, 2))], axis=1)

    def native_fn(x, w, b):
        return native.conv(x, w, pads, b, relu=relu, stats=True)

    y_shape = jax.eval_shape(lambda: _lax_conv(x, w, pads)).shape
    g_y = _rand(15, y_shape)
    g_s = _rand(16, (5, 2, w_shape[3]))
    for name, fn in (("native", native_fn), ("lax", reference)):
        (y, s), vjp = jax.vjp(fn, x, w, b)
        if name == "native":
            got = (y, s, *vjp((g_y, g_s)))
        else:
            want = (y, s, *vjp((g_y, g_s)))
    for what, a, e in zip(("y", "sums", "dx", "dw", "db"), got, want, strict=True):
        _assert_close(a, e, what)


@pytest.mark.parametrize(
    "x_shape,w_shape,pads,window",
    [
        ((3, 26, 26, 8), (3, 3, 8, 16), ((0, 0), (0, 0)), (2, 2)),  # tiny's: Winograd dx
        ((3, 9, 11, 10), (3, 3, 10, 16), ((1, 1), (1, 1)), (2, 2)),  # a row, a column past
        ((2, 10, 10, 4), (1, 1, 4, 24), ((0, 0), (0, 0)), (3, 2)),  # 3x2 windows
        ((2, 8, 8, 32), (3, 3, 32, 32), ((0, 0), (0, 0)), (2, 3)),
        ((5, 9, 8, 3), (3, 3, 3, 8), ((1, 0), (0, 2)), (2, 2)),  # asymmetric pads, B % 4 != 0
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_pool_gradient_made_as_read_is_the_same_bits(x_shape, w_shape, pads, window, bias):
    """conv_pool_grads: the gradients of relu(conv) under batch norm and a max pool, one call
    making bn_max_pool_grad's gradient image by image, are those of the conv's VJP taking it
    written: the same bits (dx, dw, db), with row weights of 1 and 0."""
    x, w = _rand(40, x_shape), 0.3 * _rand(41, w_shape)
    b = 0.1 * _rand(42, w_shape[3:]) if bias else None
    rng = np.random.default_rng(43)
    o = w_shape[3]
    inv = jnp.asarray(rng.uniform(0.5, 2.0, o), jnp.float32)
    shift, c1, c2 = (jnp.asarray(rng.standard_normal(o), jnp.float32) * s for s in (1, 0.1, 0.1))
    w_B = jnp.ones(x_shape[0], jnp.float32).at[1].set(0.0)

    def relu_conv(x, w, b):
        return native.conv(x, w, pads, b, relu=True)

    a, vjp = jax.vjp(relu_conv, x, w, b)
    pooled, at, _ = native.bn_max_pool(a, inv, shift, window)
    g = _rand(44, pooled.shape)
    want = vjp(native.bn_max_pool_grad(g, at, a, inv, c1, c2, w_B, window))
    got = jax.jit(native.conv_pool_grads, static_argnums=(3, 11))(
        x, w, b, pads, a, g, at, inv, c1, c2, w_B, window
    )
    assert float(jnp.abs(want[0]).max()) > 0  # the pooled gradient reached x
    for what, got_i, want_i in zip(("dx", "dw", "db"), got, want, strict=True):
        if want_i is None:
            assert got_i is None, what
        else:
            np.testing.assert_array_equal(got_i, want_i, err_msg=what)


@pytest.mark.parametrize("window,c", [((2, 2), 16), ((3, 2), 8)])
def test_bn_pool_keeps_the_input_at_each_maximum_and_sums_from_it(window, c):
    """bn_max_pool's third output is x at the place it returns (a negative inv: the smallest
    x; a tied window: the first place); bn_max_pool_sums reads only it and the pooled g."""
    rng = np.random.default_rng(52)
    x = rng.standard_normal((3, 7, 9, c)).astype(np.float32)
    x[0, :3, :2, :] = 0.5  # the first window tied (2x2 or 3x2)
    inv = rng.uniform(0.5, 2.0, c).astype(np.float32)
    inv[1] = -inv[1]
    shift, mean = _rand(53, (c,)), _rand(54, (c,))
    pooled, at, x_at = jax.jit(native.bn_max_pool, static_argnums=3)(x, inv, shift, window)
    kh, kw = window
    hq, wq = 7 // kh, 9 // kw
    win_x = x[:, : hq * kh, : wq * kw].reshape(3, hq, kh, wq, kw, c).transpose(0, 1, 3, 2, 4, 5)
    win_x = win_x.reshape(3, hq, wq, kh * kw, c)
    z = (win_x.astype(np.float64) * inv + shift).astype(np.float32)  # as one fma rounds it
    np.testing.assert_array_equal(at, np.argmax(z, axis=3))
    np.testing.assert_array_equal(pooled, np.max(z, axis=3))
    np.testing.assert_array_equal(
        x_at,
        np.take_along_axis(win_x, np.asarray(at)[:, :, :, None].astype(np.int64), 3)[:, :, :, 0],
    )
    np.testing.assert_array_equal(np.asarray(at)[0, 0, 0], 0)  # the tie: the first place
    np.testing.assert_array_equal(x_at[0, 0, 0], 0.5)
    g = _rand(55, pooled.shape)
    sums = native.bn_max_pool_sums(g, x_at, mean)
    want = np.stack([g.sum((1, 2)), (g * (np.asarray(x_at) - mean)).sum((1, 2))], axis=1)
    np.testing.assert_allclose(sums, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="g and xa of one shape"):
        native.bn_max_pool_sums(g, x_at[:, :1], mean)
    with pytest.raises(Exception, match=r"mean \(C,\)"):
        native.bn_max_pool_sums(g, x_at, mean[:4])


def test_pool_gradients_refuse_operands_that_do_not_match():
    """One error naming what cnn_conv_pool_grads expects, for each kind of mismatch."""
    x = _rand(45, (2, 8, 8, 4))

    def call(o=8, wf_o=None, c2_n=None, w_n=2, at_rows=3, rows=6):
        a, g = np.abs(_rand(46, (2, rows, 6, o))), _rand(47, (2, 3, 3, o))
        at, inv, c1 = np.zeros((2, at_rows, 3, o), np.uint8), _rand(48, (o,)), _rand(50, (o,))
        c2, w_B = _rand(51, (c2_n or o,)), np.ones(w_n, np.float32)
        wf = _rand(49, (3, 3, wf_o or o, 4))
        out = (
            jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct((3, 3, 4, o), jnp.float32),
            jax.ShapeDtypeStruct((o,), jnp.float32),
        )
        attrs = dict(**native._pad_attrs(((0, 0), (0, 0))), **native._window((2, 2)), bias=True)
        return jax.ffi.ffi_call("cnn_conv_pool_grads", out, vmap_method="sequential")(
            x, wf, a, g, at, inv, c1, c2, w_B, **attrs
        )

    assert [r.shape for r in call()] == [(2, 8, 8, 4), (3, 3, 4, 8), (8,)]
    with pytest.raises(Exception, match=r"the flipped kernel \(KH, KW, O, C\)"):
        call(wf_o=7)
    with pytest.raises(Exception, match=r"inv, c1 and c2 \(C,\), w \(B,\)"):
        call(c2_n=7)
    with pytest.raises(Exception, match=r"inv, c1 and c2 \(C,\), w \(B,\)"):
        call(w_n=3)
    with pytest.raises(Exception, match="places shaped"):
        call(at_rows=2)
    with pytest.raises(Exception, match="8, 16, 24 or 32 channels"):
        call(o=12)
    with pytest.raises(Exception, match="does not match the geometry"):
        call(rows=7)


# (x shape, conv kernel, pads, 1x1 outputs): the eip net's layers (1 -> 32 -> 10, the 1x1
# kernel gradient swapped), Winograd for the conv and its input gradient (4 -> 16, even
# output), asymmetric pads and 16 outputs (not swapped), 8 between and a batch of 7 (groups of
# 4 images and a rest), 24 between with a ragged 1 out.
PW_CASES = [
    ((6, 28, 28, 1), (3, 3), ((0, 0), (0, 0)), 10),
    ((3, 10, 10, 4), (3, 3), ((0, 0), (0, 0)), 8),
    ((5, 9, 11, 3), (3, 3), ((1, 1), (0, 2)), 16),
    ((7, 8, 8, 16), (3, 3), ((1, 1), (1, 1)), 5),
    ((2, 7, 6, 2), (2, 3), ((1, 0), (0, 2)), 1),
]
PW_MIDS = [32, 16, 16, 8, 24]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "x_shape,kernel,pads,c_out,c_mid",
    [(*c, m) for c, m in zip(PW_CASES, PW_MIDS, strict=True)],
    ids=lambda v: str(v),
)
def test_conv_pw_is_the_same_bits_as_the_two_convs(x_shape, kernel, pads, c_out, c_mid, bias):
    """conv_pw (a conv, relu, a 1x1 conv, relu; one call each way) gives the values and the
    gradients of native.conv taking the two layers one after another, bit for bit, and those
    of lax within float32 rounding; x's gradient too (its own call)."""
    x, w = _rand(60, x_shape), 0.3 * _rand(61, (*kernel, x_shape[3], c_mid))
    w2 = 0.3 * _rand(62, (1, 1, c_mid, c_out))
    b, b2 = (0.1 * _rand(63, (c_mid,)), 0.1 * _rand(64, (c_out,))) if bias else (None, None)
    no_pad = ((0, 0), (0, 0))

    def two_convs(x, w, b, w2, b2):
        return native.conv(native.conv(x, w, pads, b, relu=True), w2, no_pad, b2, relu=True)

    def with_lax(x, w, b, w2, b2):
        a = jax.nn.relu(_lax_conv(x, w, pads) + (0.0 if b is None else b.reshape(1, 1, 1, -1)))
        y = _lax_conv(a, w2, no_pad)
        return jax.nn.relu(y + (0.0 if b2 is None else b2.reshape(1, 1, 1, -1)))

    def fused(x, w, b, w2, b2):
        return native.conv_pw(x, w, b, w2, b2, pads)

    def outputs(f):
        y, vjp = jax.vjp(f, x, w, b, w2, b2)
        return (y, *vjp(_rand(65, y.shape)))

    got = jax.jit(lambda: outputs(fused))()
    want, lax_want = outputs(two_convs), outputs(with_lax)
    names = ("y", "dx", "dw", "db", "dw2", "db2")
    assert float(jnp.abs(got[1]).max()) > 0 and float(jnp.abs(got[4]).max()) > 0
    for what, g, w_, l_ in zip(names, got, want, lax_want, strict=True):
        if w_ is None:
            assert g is None, what
        else:
            np.testing.assert_array_equal(g, w_, err_msg=what)
            _assert_close(g, l_, what)


def test_conv_pw_x_gradient_is_dropped_where_x_needs_none():
    """Two backward calls: the kernels' and x's; XLA drops x's when only the kernels'
    gradients are taken (as for a network's input)."""
    x, w, w2 = _rand(66, (2, 8, 8, 1)), _rand(67, (3, 3, 1, 8)), _rand(68, (1, 1, 8, 3))
    pads = ((0, 0), (0, 0))

    def loss(w, w2, x):
        return jnp.sum(native.conv_pw(x, w, None, w2, None, pads))

    def calls(argnums):
        hlo = jax.jit(jax.grad(loss, argnums)).lower(w, w2, x).compile().as_text()
        return hlo.count('custom_call_target="cnn_conv_pw_grads"')

    assert calls((0, 1)) == 1
    assert calls((0, 1, 2)) == 2


def test_conv_pw_refuses_operands_that_do_not_match():
    """One error naming what cnn_conv_pw(_grads) expect, for each kind of mismatch."""
    x = _rand(69, (2, 8, 8, 3))

    def forward(m=8, w2_in=None, b2_n=4, pads=((0, 0), (0, 0))):
        w, b = _rand(70, (3, 3, 3, m)), _rand(71, (m,))
        w2, b2 = _rand(72, (1, 1, w2_in or m, 4)), _rand(73, (b2_n,))
        ho, wo = 6 + sum(pads[0]), 6 + sum(pads[1])
        out = (native._f32((2, ho, wo, 4)), native._f32((2, ho, wo, m)))
        return jax.ffi.ffi_call("cnn_conv_pw", out, vmap_method="sequential")(
            x, w, b, w2, b2, **native._pad_attrs(pads)
        )

    def grads(swap=True, input_grad=False, dw_n=None, y_rows=6, a_rows=6):
        wf, w2t = _rand(74, (3, 3, 8, 3)), _rand(75, (1, 1, 4, 8))
        y, g = np.abs(_rand(76, (2, y_rows, 6, 4))), _rand(77, (2, y_rows, 6, 4))
        a = np.abs(_rand(78, (2, a_rows, 6, 8)))
        none = native._f32((0,))
        if input_grad:
            out = (native._f32(x.shape), none, none, none, none)
        else:
            dw = native._f32((dw_n or 3 * 3 * 3 * 8,))
            out = (none, dw, native._f32((8,)), native._f32((1, 1, 4, 8)), native._f32((4,)))
        attrs = dict(**native._pad_attrs(((0, 0), (0, 0))), swap=swap, input_grad=input_grad)
        return jax.ffi.ffi_call("cnn_conv_pw_grads", out, vmap_method="sequential")(
            x, wf, w2t, y, a, g, **attrs
        )

    assert [r.shape for r in forward()] == [(2, 6, 6, 4), (2, 6, 6, 8)]
    assert [r.shape for r in grads()] == [(0,), (216,), (8,), (1, 1, 4, 8), (4,)]
    assert grads(input_grad=True)[0].shape == x.shape
    with pytest.raises(Exception, match="8, 16, 24 or 32 in a"):
        forward(m=12)
    with pytest.raises(Exception, match=r"w2 \(1, 1, M, N\) and b2 \(N,\)"):
        forward(w2_in=16)
    with pytest.raises(Exception, match=r"w2 \(1, 1, M, N\) and b2 \(N,\)"):
        forward(b2_n=5)
    with pytest.raises(Exception, match="pads of at most k - 1"):
        forward(pads=((3, 0), (0, 0)))
    with pytest.raises(Exception, match="swap exactly when N is not a multiple of 8"):
        grads(swap=False)
    with pytest.raises(Exception, match="does not match the geometry"):
        grads(y_rows=5)
    with pytest.raises(Exception, match=r"a \(B, Ho, Wo, M\)"):
        grads(a_rows=5)
    with pytest.raises(Exception, match="dw and dw2 shaped as the kernels"):
        grads(dw_n=7)
