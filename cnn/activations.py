"""Activation functions: pure, elementwise (softmax and log_softmax over an axis)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def relu(x: Array) -> Array:
    """max(x, 0), with derivative 0 at 0 as in PyTorch (jax.nn.relu's custom JVP).

    Autodiff of jnp.maximum would give 1/2 there, and costs a divide per element.
    """
    return jax.nn.relu(x)


def leaky_relu(x: Array, negative_slope: float = 0.01) -> Array:
    return jnp.where(x >= 0, x, jnp.asarray(negative_slope, x.dtype) * x)


def elu(x: Array, alpha: float = 1.0) -> Array:
    return jnp.where(x > 0, x, jnp.asarray(alpha, x.dtype) * jnp.expm1(jnp.minimum(x, 0)))


def gelu(x: Array, approximate: bool = False) -> Array:
    return jax.nn.gelu(x, approximate=approximate)


def silu(x: Array) -> Array:
    return x * jax.nn.sigmoid(x)


def sigmoid(x: Array) -> Array:
    return jax.nn.sigmoid(x)


def tanh(x: Array) -> Array:
    return jnp.tanh(x)


def softplus(x: Array) -> Array:
    return jnp.logaddexp(x, jnp.zeros((), x.dtype))


def softmax(x: Array, axis: int = -1) -> Array:
    return jax.nn.softmax(x, axis=axis)


def log_softmax(x: Array, axis: int = -1) -> Array:
    return jax.nn.log_softmax(x, axis=axis)


def identity(x: Array) -> Array:
    return x


_REGISTRY: dict[str, Callable[[Array], Array]] = {
    "relu": relu,
    "leaky_relu": leaky_relu,
    "elu": elu,
    "gelu": gelu,
    "silu": silu,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "softplus": softplus,
    "softmax": softmax,
    "log_softmax": log_softmax,
    "identity": identity,
}
NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def get(name: str) -> Callable[[Array], Array]:
    """The activation called `name`; a ValueError lists the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(NAMES)}") from None
