"""Activations against closed forms: values, dtypes, derivatives and the registry."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import activations

X = np.concatenate([np.linspace(-6.0, 6.0, 49), [-30.0, -1e-3, 0.0, 1e-3, 30.0]]).astype(np.float32)
X2D = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32) * 3


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


_erf = np.vectorize(math.erf)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# name -> (value, derivative) in float64; derivatives are for the elementwise functions.
REFS = {
    "relu": (lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(float)),
    "leaky_relu": (
        lambda x: np.where(x >= 0, x, 0.01 * x),
        lambda x: np.where(x > 0, 1.0, 0.01),
    ),
    "elu": (lambda x: np.where(x > 0, x, np.expm1(x)), lambda x: np.where(x > 0, 1.0, np.exp(x))),
    "gelu": (
        lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
        lambda x: (
            0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
            + x * np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
        ),
    ),
    "silu": (
        lambda x: x * _sigmoid(x),
        lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))),
    ),
    "sigmoid": (_sigmoid, lambda x: _sigmoid(x) * (1.0 - _sigmoid(x))),
    "tanh": (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2),
    "softplus": (lambda x: np.logaddexp(x, 0.0), _sigmoid),
    "identity": (lambda x: x, np.ones_like),
    "softmax": (_softmax, None),
    "log_softmax": (lambda x: np.log(_softmax(x)), None),
}


def test_every_name_has_a_reference():
    assert set(activations.NAMES) == set(REFS)
    assert list(activations.NAMES) == sorted(activations.NAMES)


@pytest.mark.parametrize("name", sorted(REFS))
def test_values_dtype_and_finite_gradient(name):
    fn = activations.get(name)
    ref, _ = REFS[name]
    for x in (X, X2D):
        y = fn(jnp.asarray(x))
        assert y.dtype == jnp.float32
        assert y.shape == x.shape
        np.testing.assert_allclose(y, ref(x.astype(np.float64)), rtol=2e-6, atol=2e-6)
        cot = jnp.asarray(np.linspace(-1.0, 1.0, x.size, dtype=np.float32).reshape(x.shape))
        g = jax.grad(lambda v, cot=cot: jnp.sum(fn(v) * cot))(jnp.asarray(x))
        assert g.dtype == jnp.float32
        assert np.all(np.isfinite(g)), name


@pytest.mark.parametrize("name", sorted(n for n, (_, d) in REFS.items() if d is not None))
def test_elementwise_derivative(name):
    fn = activations.get(name)
    _, deriv = REFS[name]
    x = X[X != 0]  # the kinks of relu / leaky_relu / elu sit at 0
    g = jax.vmap(jax.grad(fn))(jnp.asarray(x))
    np.testing.assert_allclose(g, deriv(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_relu_family_at_zero():
    z = jnp.zeros(3)
    for name in ("relu", "leaky_relu", "elu", "gelu", "silu", "identity"):
        np.testing.assert_array_equal(activations.get(name)(z), 0.0)


def test_relu_derivative_at_zero_is_zero_as_in_jax_nn_and_pytorch():
    x = jnp.asarray([-1.0, 0.0, 0.0, 2.0])
    g = jnp.asarray([3.0, 5.0, -7.0, 11.0])
    expected = np.asarray([0.0, 0.0, 0.0, 11.0])
    _, vjp = jax.vjp(activations.relu, x)
    np.testing.assert_array_equal(vjp(g)[0], expected)
    np.testing.assert_array_equal(jax.jvp(activations.relu, (x,), (g,))[1], expected)
    np.testing.assert_array_equal(vjp(g)[0], jax.vjp(jax.nn.relu, x)[1](g)[0])
    x16 = x.astype(jnp.bfloat16)
    assert jax.grad(lambda v: activations.relu(v).sum())(x16).dtype == jnp.bfloat16


def test_leaky_relu_slope_and_elu_alpha():
    x = jnp.asarray(X)
    np.testing.assert_allclose(
        activations.leaky_relu(x, negative_slope=0.2), np.where(X >= 0, X, 0.2 * X), rtol=1e-6
    )
    np.testing.assert_allclose(activations.leaky_relu(jnp.asarray(-2.0)), -0.02, rtol=1e-6)
    np.testing.assert_allclose(
        activations.elu(x, alpha=0.5),
        np.where(X > 0, X, 0.5 * np.expm1(X.astype(np.float64))),
        rtol=1e-6,
        atol=1e-7,
    )
    assert float(activations.elu(jnp.asarray(-100.0), alpha=0.5)) == pytest.approx(-0.5)
    np.testing.assert_allclose(
        activations.gelu(x, approximate=True), jax.nn.gelu(x, approximate=True), rtol=1e-6
    )


def test_softmax_and_log_softmax():
    x = jnp.asarray(X2D)
    for axis in (-1, 0):
        s = activations.softmax(x, axis=axis)
        np.testing.assert_allclose(np.sum(s, axis=axis), 1.0, rtol=1e-6)
        np.testing.assert_allclose(s, _softmax(X2D.astype(np.float64), axis=axis), rtol=1e-5)
        np.testing.assert_allclose(
            activations.log_softmax(x, axis=axis), np.log(np.asarray(s)), rtol=1e-5, atol=1e-6
        )
    # numerically stable for large logits
    big = jnp.asarray([[1000.0, 999.0, -1000.0]])
    s = activations.softmax(big)
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s[0, :2], _softmax(np.array([1.0, 0.0])), rtol=1e-6)
    assert np.all(np.isfinite(activations.log_softmax(big)))
    # shift invariance
    np.testing.assert_allclose(activations.softmax(x + 5.0), activations.softmax(x), rtol=1e-5)


def test_get_returns_the_function_and_rejects_unknown_names():
    for name in activations.NAMES:
        assert activations.get(name) is getattr(activations, name)
    for bad in ("nope", "ReLU", ["relu"]):
        with pytest.raises(ValueError, match="unknown activation") as info:
            activations.get(bad)
        for name in activations.NAMES:
            assert name in str(info.value)
