"""Test-wide JAX settings: strict dtypes, no silent rank promotion, real MNIST located."""

import os
import pathlib

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

_REPO = pathlib.Path(__file__).resolve().parents[1]
# CI sets MNIST_DIR; a developer checkout finds the shared copy beside the repository.
os.environ.setdefault("MNIST_DIR", str(_REPO.parent / "shared" / "data" / "mnist"))
