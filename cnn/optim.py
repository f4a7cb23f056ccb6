"""Optimizers: optax's Adam, with its moment update as one native pass for large arrays.

XLA's CPU loops take ~1.6 ns per value for Adam's update of a (26, 26, 10, 10) kernel (a sqrt
and a divide in a 4-D loop); the native pass (`cnn.native.adam_moments`) is vectorized and reads
and writes each array once. It computes optax's expressions; the last bit of a value can differ
from what XLA makes of them. The state is optax's, so checkpoints do not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cnn import native

# Smaller arrays stay in XLA's fusions. Measured (BENCHMARKS.md): no gain in the step at 18,432
# values (fast99, eip_session1), +8.7% at 67,600 (eip_session1_original).
NATIVE_MIN_SIZE = 32768


def _native_leaf(g) -> bool:
    return g is not None and g.dtype == jnp.float32 and g.size >= NATIVE_MIN_SIZE


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """optax.scale_by_adam(b1, b2, eps) with the same state; on a CPU with the native library,
    float32 arrays of NATIVE_MIN_SIZE or more values take the native pass (the others, and every
    array elsewhere, get optax's bits)."""
    base = optax.scale_by_adam(b1, b2, eps)

    def update_fn(updates, state, params=None):
        if native.unavailable_reason() is not None:
            return base.update(updates, state, params)
        big = jax.tree.map(_native_leaf, updates)
        keep = lambda t, b: None if b else t  # noqa: E731
        small = base.update(
            jax.tree.map(keep, updates, big),
            optax.ScaleByAdamState(
                state.count, jax.tree.map(keep, state.mu, big), jax.tree.map(keep, state.nu, big)
            ),
        )
        small_u, small_state = small
        count_inc = small_state.count
        bc_2 = jnp.stack([1 - b1**count_inc, 1 - b2**count_inc]).astype(jnp.float32)

        def leaf(g, mu, nu, b):
            return native.adam_moments(g, mu, nu, bc_2, b1=b1, b2=b2, eps=eps) if b else None

        triples = jax.tree.map(leaf, updates, state.mu, state.nu, big)
        pick = lambda i: lambda t, s, b: t[i] if b else s  # noqa: E731
        is_triple = lambda t: isinstance(t, tuple) or t is None  # noqa: E731
        new_u = jax.tree.map(pick(0), triples, small_u, big, is_leaf=is_triple)
        mu = jax.tree.map(pick(1), triples, small_state.mu, big, is_leaf=is_triple)
        nu = jax.tree.map(pick(2), triples, small_state.nu, big, is_leaf=is_triple)
        return new_u, optax.ScaleByAdamState(count_inc, mu, nu)

    return optax.GradientTransformation(base.init, update_fn)


def adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """optax.adam, with `scale_by_adam` above (the same state)."""
    return optax.chain(scale_by_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))


def adamw(learning_rate, weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps=1e-8):
    """optax.adamw, with `scale_by_adam` above (the same state)."""
    return optax.chain(
        scale_by_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
