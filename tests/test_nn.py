"""Flax modules: thin wrappers over cnn.layers, their params, shape inference and Sequential."""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import activations, layers
from cnn.models import eip_session1_original
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

KEY = jax.random.PRNGKey(0)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _num_params(variables):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables.get("params", {})))


# ----------------------------------------------------------------------------- Conv
CONV_CASES = [
    # (module kwargs, input shape)
    (dict(features=5, kernel_size=3), (2, 8, 8, 3)),
    (
        dict(features=6, kernel_size=(3, 2), stride=(1, 2), padding=1, dilation=2, groups=2),
        (1, 9, 8, 4),
    ),
    (dict(features=4, kernel_size=1, stride=2, padding="SAME", groups=4), (2, 7, 7, 4)),
    (dict(features=3, kernel_size=5, padding=((1, 2), (0, 1)), use_bias=False), (1, 9, 8, 2)),
    (dict(features=2, kernel_size=4, padding="VALID", impl="im2col"), (2, 4, 4, 3)),
]


@pytest.mark.parametrize("kwargs,x_shape", CONV_CASES, ids=str)
def test_conv_wraps_conv2d(kwargs, x_shape):
    conv = Conv(**kwargs)
    x = _x(x_shape)
    variables = conv.init(KEY, x)
    params = variables["params"]
    kh, kw = (
        (kwargs["kernel_size"],) * 2
        if isinstance(kwargs["kernel_size"], int)
        else kwargs["kernel_size"]
    )
    groups = kwargs.get("groups", 1)
    assert params["kernel"].shape == (kh, kw, x_shape[3] // groups, kwargs["features"])
    if kwargs.get("use_bias", True):
        assert params["bias"].shape == (kwargs["features"],)
        params = {"kernel": params["kernel"], "bias": params["bias"] + 0.5}  # non-zero bias
    else:
        assert set(params) == {"kernel"}
    y = conv.apply({"params": params}, x)
    expected = layers.conv2d(
        x,
        params["kernel"],
        params.get("bias"),
        stride=kwargs.get("stride", 1),
        padding=kwargs.get("padding", 0),
        dilation=kwargs.get("dilation", 1),
        groups=groups,
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert conv.output_shape(x_shape) == y.shape
    assert conv.num_params(x_shape) == _num_params(variables)
    _, ho, wo, f = y.shape
    assert conv.macs(x_shape) == kh * kw * (x_shape[3] // groups) * ho * wo * f


def test_conv_rejects_bad_inputs():
    with pytest.raises(ValueError, match="rank 4"):
        Conv(4, 3).init(KEY, jnp.ones((8, 8, 3)))
    with pytest.raises(ValueError, match="groups=2 must divide the input channels"):
        Conv(4, 3, groups=2).init(KEY, jnp.ones((1, 8, 8, 3)))


# ----------------------------------------------------------------------------- other modules
POINTWISE_CASES = [
    (MaxPool(2), lambda x: layers.max_pool(x, 2), (2, 7, 7, 3)),
    (MaxPool(3, 2, "SAME"), lambda x: layers.max_pool(x, 3, 2, "SAME"), (1, 8, 8, 2)),
    (AvgPool(2, 1, 1), lambda x: layers.avg_pool(x, 2, 1, 1), (2, 6, 5, 2)),
    (AvgPool((2, 3)), lambda x: layers.avg_pool(x, (2, 3)), (1, 6, 9, 2)),
    (GlobalAvgPool(), layers.global_avg_pool, (2, 5, 4, 3)),
    (Activation("elu"), activations.elu, (2, 4, 4, 3)),
    (Activation("softmax"), activations.softmax, (2, 10)),
    (Flatten(), lambda x: x.reshape(x.shape[0], -1), (2, 3, 4, 5)),
    (Dropout(0.5), lambda x: x, (2, 4, 4, 3)),
]


@pytest.mark.parametrize(
    "module,fn,x_shape", POINTWISE_CASES, ids=[type(c[0]).__name__ for c in POINTWISE_CASES]
)
def test_module_wraps_pure_function(module, fn, x_shape):
    x = _x(x_shape, seed=1)
    variables = module.init(KEY, x)
    assert _num_params(variables) == 0
    y = module.apply(variables, x)
    np.testing.assert_allclose(y, fn(x), rtol=1e-6, atol=1e-6)
    assert module.output_shape(x_shape) == y.shape


def test_flatten_is_row_major_nhwc():
    x = jnp.arange(2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4)
    y = Flatten().apply({}, x)
    np.testing.assert_array_equal(y, np.arange(48, dtype=np.float32).reshape(2, 24))


# ----------------------------------------------------------------------------- BatchNorm
def test_batch_norm_module_train_and_eval():
    bn = BatchNorm(momentum=0.8)
    x = _x((4, 3, 3, 2), seed=2) * 2.0 + 1.0
    variables = bn.init(KEY, x, train=True)  # init must not update the running stats
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(2))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(2))
    assert variables["params"]["scale"].shape == variables["params"]["bias"].shape == (2,)
    assert bn.num_params(x.shape) == _num_params(variables) == 4
    params = {"scale": jnp.asarray([1.5, 0.5]), "bias": jnp.asarray([0.1, -0.2])}

    y, updates = bn.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    y_ref, m_ref, v_ref = layers.batch_norm(
        x, params["scale"], params["bias"], jnp.zeros(2), jnp.ones(2), train=True, momentum=0.8
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], m_ref, rtol=1e-6)
    np.testing.assert_allclose(stats["var"], v_ref, rtol=1e-6)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(stats["mean"], 0.2 * x64.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.8 + 0.2 * x64.var(axis=(0, 1, 2)), rtol=1e-5)

    eval_vars = {"params": params, "batch_stats": stats}
    x_new = _x((2, 3, 3, 2), seed=3)
    y1 = bn.apply(eval_vars, x_new, train=False)
    y2 = bn.apply(eval_vars, x_new, train=False)
    np.testing.assert_array_equal(y1, y2)
    y_eval_ref, _, _ = layers.batch_norm(
        x_new, params["scale"], params["bias"], stats["mean"], stats["var"], train=False
    )
    np.testing.assert_allclose(y1, y_eval_ref, rtol=1e-6, atol=1e-6)
    # eval mode leaves the stats alone even when they are mutable
    _, same = bn.apply(eval_vars, x_new, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(same["batch_stats"]["mean"], stats["mean"])
    np.testing.assert_array_equal(same["batch_stats"]["var"], stats["var"])


def test_batch_norm_module_mask():
    bn = BatchNorm()
    x = _x((4, 2, 2, 3), seed=4)
    x = x.at[1].set(50.0)
    variables = bn.init(KEY, x)
    mask = jnp.asarray([1.0, 0.0, 1.0, 1.0])
    y, upd = bn.apply(variables, x, train=True, mask_B=mask, mutable=["batch_stats"])
    kept = np.asarray(mask) == 1
    y_sub, upd_sub = bn.apply(variables, x[kept], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y)[kept], y_sub, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        upd["batch_stats"]["mean"], upd_sub["batch_stats"]["mean"], rtol=1e-5
    )


# ----------------------------------------------------------------------------- Dropout
def test_dropout_module_needs_rng_when_training():
    x = jnp.ones((64, 64))
    d = Dropout(0.25)
    np.testing.assert_array_equal(d.apply({}, x, train=False), x)
    with pytest.raises(flax.errors.InvalidRngError):
        d.apply({}, x, train=True)
    y = np.asarray(d.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert 0.15 < (y == 0).mean() < 0.35
    y2 = d.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, train=True), x)


# ----------------------------------------------------------------------------- Activation
def test_activation_unknown_name_raises_at_construction():
    with pytest.raises(ValueError, match="unknown activation 'nope'") as info:
        Activation("nope")
    for name in activations.NAMES:
        assert name in str(info.value)


# ----------------------------------------------------------------------------- Sequential
def _small_stack():
    return Sequential(
        [
            Conv(4, 3, padding="SAME", name="stem"),
            BatchNorm(),
            Activation("relu"),
            Dropout(0.5),
            MaxPool(2),
            Conv(6, 3, stride=2, padding=1),
            AvgPool(2, 1),
            GlobalAvgPool(),
        ]
    )


def test_sequential_names_and_features():
    model = _small_stack()
    assert model.names == (
        "stem",
        "1_batchnorm",
        "2_activation",
        "3_dropout",
        "4_maxpool",
        "5_conv",
        "6_avgpool",
        "7_globalavgpool",
    )
    x = _x((2, 9, 9, 3), seed=5)
    variables = model.init(KEY, x)
    y, feats = model.apply(variables, x, return_features=True)
    assert list(feats) == list(model.names)
    np.testing.assert_array_equal(feats["7_globalavgpool"], y)
    assert [f.shape for f in feats.values()] == model.output_shapes(x.shape)
    assert y.shape == (2, 6)
    # each layer's output is that layer applied to the previous one
    p = variables["params"]
    relu = jnp.maximum(feats["1_batchnorm"], 0.0)
    np.testing.assert_allclose(feats["2_activation"], relu, rtol=1e-6)
    conv5 = layers.conv2d(
        feats["4_maxpool"], p["layers_5"]["kernel"], p["layers_5"]["bias"], stride=2, padding=1
    )
    np.testing.assert_allclose(feats["5_conv"], conv5, rtol=1e-5, atol=1e-5)
    # names survive a second construction and clones
    assert model.clone().names == model.names


@pytest.mark.parametrize(
    "stack,in_shape",
    [
        ([Conv(8, 3), MaxPool(2), Flatten()], (2, 10, 10, 1)),
        ([Conv(4, 5, stride=2, padding="SAME"), AvgPool(3, 2, 1), GlobalAvgPool()], (1, 11, 9, 2)),
        ([Conv(4, 1, groups=2), BatchNorm(), Activation("tanh"), Flatten()], (2, 3, 3, 4)),
    ],
    ids=["conv-pool-flatten", "strided", "grouped"],
)
def test_sequential_output_shapes(stack, in_shape):
    model = Sequential(stack)
    x = _x(in_shape)
    variables = model.init(KEY, x)
    _, feats = model.apply(variables, x, return_features=True)
    assert model.output_shapes(in_shape) == [f.shape for f in feats.values()]


def test_sequential_duplicate_names_raise():
    with pytest.raises(ValueError, match="unique"):
        Sequential([Conv(4, 3, name="a"), Conv(4, 3, name="a")])
    with pytest.raises(ValueError, match="unique"):
        Sequential([Conv(4, 3), Activation("relu", name="0_conv")])


def test_sequential_passes_train_to_every_layer():
    model = _small_stack()
    x = _x((2, 9, 9, 3), seed=6)
    variables = model.init(KEY, x)
    before = variables["batch_stats"]
    # eval: deterministic, no rng needed, stats unchanged
    y1 = model.apply(variables, x)
    y2 = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(y1, y2)
    # train: BatchNorm updates its stats and Dropout drops (so it needs an rng)
    with pytest.raises(flax.errors.InvalidRngError):
        model.apply(variables, x, train=True, mutable=["batch_stats"])
    (y, feats), upd = model.apply(
        variables,
        x,
        train=True,
        return_features=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.PRNGKey(2)},
    )
    assert not np.allclose(upd["batch_stats"]["layers_1"]["mean"], before["layers_1"]["mean"])
    act, drop = np.asarray(feats["2_activation"]), np.asarray(feats["3_dropout"])
    assert np.any((drop == 0) & (act > 0))  # dropped units
    np.testing.assert_allclose(drop[drop != 0], 2.0 * act[drop != 0], rtol=1e-6)
    # BatchNorm ran in train mode: its output is normalized with the batch stats
    bn_out = np.asarray(feats["1_batchnorm"], np.float64)
    np.testing.assert_allclose(bn_out.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)


def test_sequential_mask_reaches_batch_norm():
    model = Sequential([Conv(3, 1), BatchNorm(), Flatten()])
    x = _x((3, 2, 2, 2), seed=7)
    variables = model.init(KEY, x)
    mask = jnp.asarray([1.0, 1.0, 0.0])
    y, _ = model.apply(variables, x, train=True, mask_B=mask, mutable=["batch_stats"])
    y_sub, _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y[:2], y_sub, rtol=1e-5, atol=1e-5)


def test_no_retracing_on_same_shapes():
    model = _small_stack()
    x = _x((2, 9, 9, 3))
    variables = model.init(KEY, x)

    def forward(variables, x):
        return model.apply(variables, x)

    apply = jax.jit(chex.assert_max_traces(forward, n=1))
    for seed in range(3):
        assert apply(variables, _x((2, 9, 9, 3), seed=seed)).shape == (2, 6)
    with pytest.raises(AssertionError, match="trace"):
        apply(variables, _x((3, 9, 9, 3)))


# ----------------------------------------------------------------------------- the course net
def test_course_network():
    model = eip_session1_original()
    x = _x((2, 28, 28, 1), seed=8)
    variables = model.init(KEY, x)
    assert _num_params(variables) == 68_260
    in_shape = (2, 28, 28, 1)
    assert sum(m.num_params(s) for m, s in _conv_inputs(model, in_shape)) == 68_260
    assert model.output_shapes(in_shape) == [
        (2, 26, 26, 32),
        (2, 26, 26, 32),
        (2, 26, 26, 10),
        (2, 26, 26, 10),
        (2, 1, 1, 10),
        (2, 10),
        (2, 10),
    ]
    y = model.apply(variables, x)
    assert y.shape == (2, 10)
    np.testing.assert_allclose(jnp.sum(y, axis=1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(y) >= 0)


def _conv_inputs(model, in_shape):
    shapes = [tuple(in_shape), *model.output_shapes(in_shape)]
    return [(m, shapes[i]) for i, m in enumerate(model.layers) if isinstance(m, Conv)]


@pytest.mark.parametrize("impl", ["native", "xla"])
def test_sequential_fuses_conv_then_relu_with_the_same_values_and_gradients(impl):
    """Conv then relu is one conv2d(activation="relu") call; features still show both layers."""
    model = Sequential(
        [Conv(8, 3, impl=impl), Activation("relu"), Conv(4, 1, impl=impl), Activation("relu")]
    )
    x = _x((3, 7, 7, 2), seed=7)
    variables = model.init(KEY, x)
    p = variables["params"]

    def by_hand(p, x):
        h = jax.nn.relu(layers.conv2d(x, p["layers_0"]["kernel"], p["layers_0"]["bias"], impl=impl))
        return jax.nn.relu(layers.conv2d(h, p["layers_2"]["kernel"], p["layers_2"]["bias"]))

    def loss(fn):
        return lambda p, x: jnp.sum(jnp.sin(fn(p, x)))

    fused = jax.jit(jax.value_and_grad(loss(lambda p, x: model.apply({"params": p}, x))))(p, x)
    want = jax.jit(jax.value_and_grad(loss(by_hand)))(p, x)
    chex.assert_trees_all_close(fused, want, rtol=2e-5, atol=2e-5)
    _, feats = model.apply(variables, x, return_features=True)
    np.testing.assert_array_equal(feats["1_activation"], jax.nn.relu(feats["0_conv"]))
    assert float(jnp.min(feats["0_conv"])) < 0  # the unfused path shows the pre-relu values


def test_sequential_fusion_calls_conv_with_the_activation(monkeypatch):
    calls = []
    real = layers.conv2d
    monkeypatch.setattr(
        layers, "conv2d", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k)
    )
    model = Sequential([Conv(4, 3), Activation("relu"), Conv(4, 3), Activation("tanh"), Conv(2, 1)])
    model.init(KEY, _x((1, 9, 9, 1)))
    assert calls == ["relu", None, None]


def test_conv2d_activation_on_every_lowering():
    x, w, b = _x((2, 6, 6, 3), 1), _x((3, 3, 3, 5), 2), _x((5,), 3)
    ref = layers.conv2d(x, w, b, impl="xla")
    for impl in ("xla", "im2col", "direct", "native"):
        for name in ("relu", "tanh"):
            got = layers.conv2d(x, w, b, impl=impl, activation=name)
            np.testing.assert_allclose(got, activations.get(name)(ref), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        layers.conv2d(x, w, b, activation="relu6")


@pytest.mark.parametrize("pool", [False, True])
def test_sequential_fuses_conv_relu_batch_norm_max_pool_when_training(pool, monkeypatch):
    """Conv, relu, BN (, max pool): the conv takes BN's sums as it writes; with the pool, all
    four run as one call (the conv's gradient kernels take the pool's gradient); the loss,
    gradients and running statistics are those of the layers one by one."""
    tail = [MaxPool(2)] if pool else []
    model = Sequential(
        [Conv(8, 3, use_bias=False), Activation("relu"), BatchNorm(), *tail, Conv(4, 1)]
    )
    x = _x((4, 9, 9, 2), seed=9)
    mask = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    variables = model.init(KEY, x)
    last = f"layers_{len(model.layers) - 1}"

    def by_hand(params, x):
        h = jax.nn.relu(layers.conv2d(x, params["layers_0"]["kernel"]))
        stats = variables["batch_stats"]["layers_2"]
        bn = params["layers_2"]
        h, m, v = layers.batch_norm(
            h, bn["scale"], bn["bias"], stats["mean"], stats["var"], train=True, mask_B=mask
        )
        h = layers.max_pool(h, 2) if pool else h
        y = layers.conv2d(h, params[last]["kernel"], params[last]["bias"])
        return y, {"layers_2": {"mean": m, "var": v}}

    def fused(params, x):
        y, upd = model.apply(
            {**variables, "params": params}, x, train=True, mask_B=mask, mutable=["batch_stats"]
        )
        return y, upd["batch_stats"]

    def loss(fn):
        def f(p, x):
            y, stats = fn(p, x)
            return jnp.sum(jnp.sin(y)), stats

        return jax.jit(jax.value_and_grad(f, has_aux=True))

    want = loss(by_hand)(variables["params"], x)
    calls = []
    real = layers.conv2d_batch_norm_max_pool
    monkeypatch.setattr(
        layers, "conv2d_batch_norm_max_pool", lambda *a, **k: calls.append(a[7]) or real(*a, **k)
    )
    got = loss(fused)(variables["params"], x)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)
    assert calls == ([2] if pool else [])
    monkeypatch.setattr(Sequential, "_conv_bn_pool", lambda self, i: False)
    chex.assert_trees_all_equal(loss(fused)(variables["params"], x), got)  # the same bits


def test_deferred_conv_needs_what_the_fused_call_takes():
    x = _x((2, 8, 8, 3))
    strided = Conv(8, 3, stride=2)
    params = strided.init(KEY, x)
    assert not strided.runs_later()
    with pytest.raises(ValueError, match="defer=True needs stride 1, dilation 1, groups=1"):
        strided.apply(params, x, defer=True)
    call = Conv(8, 3).apply(Conv(8, 3).init(KEY, x), x, defer=True)
    assert call.w_HWIO.shape == (3, 3, 3, 8) and call.x_BHWC is x
    with pytest.raises(ValueError, match="a ConvCall input needs max_pool"):
        BatchNorm().init(KEY, call, train=True)


# ------------------------------------------------------------------- batch norm folded into conv
def _fold_net():
    """BN before a VALID conv (folds), before a strided dilated one (folds), before a padded
    one (does not: the padding's zeros are not normalized values), and a plain conv head."""
    return Sequential(
        [
            Conv(8, 3, use_bias=False),
            Activation("relu"),
            BatchNorm(),
            Conv(8, 2, stride=2, dilation=2),
            Activation("relu"),
            BatchNorm(),
            Conv(8, 3, padding=1, use_bias=False),
            Activation("relu"),
            BatchNorm(),
            Conv(4, 1),
        ]
    )


def _apply_grads(model, variables, x, mask, train):
    def f(p):
        if train:
            y, upd = model.apply(
                {**variables, "params": p}, x, train=True, mask_B=mask, mutable=["batch_stats"]
            )
        else:
            y, upd = model.apply({**variables, "params": p}, x), {}
        return jnp.sum(jnp.sin(y) * mask[:, None, None, None]), (y, upd)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])


@pytest.mark.parametrize("train", [True, False])
def test_sequential_folds_batch_norm_into_the_next_conv(train, monkeypatch):
    """Folded or not, the same function: outputs, running statistics and every gradient agree,
    and the folded gradients are as close to a float64 run of the layers as the unfolded ones."""
    x = _x((6, 15, 15, 3), seed=21)
    mask = jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    folded, plain = _fold_net(), _fold_net().clone(fold_batch_norms=False)
    variables = folded.init(KEY, x)
    calls = []
    real = layers.batch_norm_affine
    monkeypatch.setattr(
        layers, "batch_norm_affine", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    got = _apply_grads(folded, variables, x, mask, train)
    assert len(calls) == 2  # not the BN before the padded conv, nor in `plain`
    want = _apply_grads(plain, variables, x, mask, train)
    assert len(calls) == 2

    def rel(a, b):  # the largest difference, relative to the array's scale
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))

    assert max(jax.tree.leaves(jax.tree.map(rel, got, want))) < 2e-5  # of each array's scale
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        ref = _apply_grads(plain, to64(variables), to64(x), to64(mask), train)
        err_fold = max(jax.tree.leaves(jax.tree.map(rel, got[1], ref[1])))
        err_plain = max(jax.tree.leaves(jax.tree.map(rel, want[1], ref[1])))
    assert err_fold < max(10 * err_plain, 1e-5), (err_fold, err_plain)


def test_tiny_folds_its_four_batch_norms_before_convs(monkeypatch):
    from cnn import models

    model = models.tiny()
    x = _x((2, 28, 28, 1))
    variables = model.init(KEY, x)
    calls = []
    real = layers.batch_norm_affine
    monkeypatch.setattr(
        layers, "batch_norm_affine", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert len(calls) == 4  # the fifth batch norm runs with the max pool after it
    _, feats = model.apply(variables, x, return_features=True)
    assert len(calls) == 4  # features are every layer's own output: nothing folds
    assert "2_batchnorm" in feats


def test_conv_in_affine_needs_no_padding():
    x = _x((1, 6, 6, 2))
    conv = Conv(3, 3, padding=1)
    params = conv.init(KEY, x)
    affine = (jnp.ones(2), jnp.zeros(2))
    with pytest.raises(ValueError, match="in_affine needs no padding and groups=1"):
        conv.apply(params, x, in_affine=affine)
    assert not conv.folds(x.shape) and Conv(3, 3).folds(x.shape)
    assert not Conv(4, 3, groups=2).folds(x.shape)


# ---------------------------------------------------------- conv, relu, 1x1 conv, relu as one
def test_sequential_runs_conv_relu_conv1x1_relu_as_one_call(monkeypatch):
    """Sequential hands conv, relu, 1x1 conv, relu to layers.conv2d_relu_conv1x1 (training and
    evaluation, a batch norm folded into the first conv), not where a BatchNorm follows (it
    takes the 1x1's statistics) nor with return_features; the same bits either way."""
    model = Sequential(
        [
            BatchNorm(),
            Conv(16, 3),
            Activation("relu"),
            Conv(10, 1),
            Activation("relu"),
            Conv(8, 3, use_bias=False),
            Activation("relu"),
            Conv(8, 1),
            Activation("relu"),
            BatchNorm(),
            Flatten(),
        ]
    )
    x = _x((3, 10, 10, 2))
    variables = model.init(KEY, x)
    calls = []
    real = layers.conv2d_relu_conv1x1
    monkeypatch.setattr(
        layers, "conv2d_relu_conv1x1", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)
    )

    def loss(p, x):
        y, upd = model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, upd)

    def step():  # traced anew each time
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    got = step()(variables["params"], x)
    assert calls == [(3, 3, 2, 16)]  # not the second pair: a BatchNorm follows it
    evaluated = model.apply(variables, x)
    _, features = model.apply(variables, x, return_features=True)
    assert len(calls) == 2 and "3_conv" in features
    monkeypatch.setattr(Sequential, "_conv_relu_conv1x1", lambda self, i: False)
    assert "cnn_conv_pw" not in step().lower(variables["params"], x).as_text()
    chex.assert_trees_all_equal(step()(variables["params"], x), got)  # the same bits
    chex.assert_trees_all_equal(model.apply(variables, x), evaluated)
    assert len(calls) == 2


def test_conv_taking_a_conv_call_needs_a_pointwise_relu_conv():
    x = _x((2, 8, 8, 3))
    first = Conv(8, 3)
    call = first.apply(first.init(KEY, x), x, defer=True)
    pointwise = Conv(4, 1)
    params = pointwise.init(KEY, call, activation="relu")
    assert params["params"]["kernel"].shape == (1, 1, 8, 4) and pointwise.pointwise()
    y = pointwise.apply(params, call, activation="relu")
    assert y.shape == (2, 6, 6, 4)
    for conv, kw in (
        (Conv(4, 3), dict(activation="relu")),
        (Conv(4, 1, padding=1), dict(activation="relu")),
        (Conv(4, 1, stride=2), dict(activation="relu")),
        (Conv(4, 1, impl="xla"), dict(activation="relu")),
        (Conv(4, 1), dict()),
        (Conv(4, 1), dict(activation="relu", stats=True)),
    ):
        with pytest.raises(ValueError, match="a ConvCall input needs this conv pointwise()"):
            conv.init(KEY, call, **kw)
