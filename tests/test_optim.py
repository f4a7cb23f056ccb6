"""cnn.optim: optax's Adam, with the native moment update for large arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn import native, optim


def _params(seed: int = 0):
    rng = np.random.default_rng(seed)
    big = (26, 26, 10, 10)  # eip_session1_original's dense kernel: the native pass
    assert np.prod(big) >= optim.NATIVE_MIN_SIZE
    return {
        "dense": {"kernel": jnp.asarray(rng.standard_normal(big), jnp.float32)},
        "conv": {
            "kernel": jnp.asarray(rng.standard_normal((3, 3, 1, 32)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal((32,)), jnp.float32),
        },
    }


def _train(tx, params, steps: int = 12):
    @jax.jit
    def step(p, s, i):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1.0)) * 1e-2, p)
        with jax.numpy_dtype_promotion("standard"):  # as train_step: optax's int32 counts
            u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = tx.init(params)
    for i in range(steps):
        params, s = step(params, s, jnp.float32(i))
    return params, s


OPTIMIZERS = {
    "adam": (lambda: optax.adam(1e-3), lambda: optim.adam(1e-3)),
    "adamw-onecycle": (
        lambda: optax.adamw(optax.cosine_onecycle_schedule(100, 1e-2), weight_decay=1e-4),
        lambda: optim.adamw(optax.cosine_onecycle_schedule(100, 1e-2), weight_decay=1e-4),
    ),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_same_state_and_values_as_optax(name):
    """The state tree is optax's (checkpoints carry over); the small arrays keep optax's bits,
    the large one (native) its values to float32 rounding."""
    ref_tx, our_tx = OPTIMIZERS[name]
    (p_ref, s_ref), (p, s) = _train(ref_tx(), _params()), _train(our_tx(), _params())
    assert jax.tree.structure(s) == jax.tree.structure(s_ref)
    assert jax.tree.structure(ref_tx().init(_params())) == jax.tree.structure(s)
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(p["conv"][k], p_ref["conv"][k])
    np.testing.assert_allclose(p["dense"]["kernel"], p_ref["dense"]["kernel"], rtol=1e-6, atol=1e-7)
    adam, adam_ref = s[0], s_ref[0]
    assert int(adam.count) == int(adam_ref.count) == 12
    for moment, ref in ((adam.mu, adam_ref.mu), (adam.nu, adam_ref.nu)):
        want = np.asarray(ref["dense"]["kernel"])  # atol: values near 0 after cancellations
        np.testing.assert_allclose(
            moment["dense"]["kernel"], want, rtol=1e-5, atol=1e-6 * np.abs(want).max()
        )
        np.testing.assert_array_equal(moment["conv"]["kernel"], ref["conv"]["kernel"])
    moved = np.abs(np.asarray(p["dense"]["kernel"] - _params()["dense"]["kernel"]))
    assert moved.min() > 0  # every value took steps


def test_only_large_float32_arrays_take_the_native_pass():
    tx = optim.adam(1e-3)
    params = _params()
    with jax.numpy_dtype_promotion("standard"):
        hlo = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
    assert hlo.count("cnn_adam") == 1


def test_without_the_native_library_it_is_optax_bit_for_bit(monkeypatch):
    monkeypatch.setenv("CNN_NATIVE", "0")
    native._load.cache_clear()
    assert not native.available()
    (p_ref, s_ref), (p, s) = (
        _train(optax.adam(1e-3), _params()),
        _train(optim.adam(1e-3), _params()),
    )
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p_ref, s_ref)), strict=True):
        np.testing.assert_array_equal(a, b)
    native._load.cache_clear()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16384, 16384 * 3 + 5])
def test_adam_moments_against_float64(n):
    """Every lane, the scalar tail and several chunks (16,384 values each) shared by the threads."""
    rng = np.random.default_rng(n)
    g, mu = (rng.standard_normal(n).astype(np.float32) * 1e-2 for _ in range(2))
    nu = np.abs(rng.standard_normal(n)).astype(np.float32) * 1e-4
    b1, b2, eps, count = 0.9, 0.999, 1e-8, 7
    bc = np.array([1 - b1**count, 1 - b2**count], np.float32)
    u, mu2, nu2 = jax.jit(lambda *a: native.adam_moments(*a, b1=b1, b2=b2, eps=eps))(g, mu, nu, bc)
    g64, mu64, nu64 = (a.astype(np.float64) for a in (g, mu, nu))
    m = (1 - b1) * g64 + b1 * mu64
    v = (1 - b2) * g64**2 + b2 * nu64
    want_u = (m / bc[0]) / (np.sqrt(v / bc[1]) + eps)
    # float32 rounding of the products and sums: within a few units in the last place of the
    # terms' magnitude (the sums cancel where g and mu differ in sign)
    for got, want, bound in (
        (mu2, m, (1 - b1) * np.abs(g64) + b1 * np.abs(mu64)),
        (nu2, v, (1 - b2) * g64**2 + b2 * nu64),
    ):
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 3e-7 * bound)
    den = np.sqrt(v / bc[1]) + eps  # u inherits mu's absolute error, plus its own rounding
    allowed = (
        1e-6 * np.abs(want_u) + 3e-7 * ((1 - b1) * np.abs(g64) + b1 * np.abs(mu64)) / bc[0] / den
    )
    assert np.all(np.abs(np.asarray(u, np.float64) - want_u) <= allowed)
