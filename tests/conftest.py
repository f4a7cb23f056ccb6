"""Test-wide JAX settings: strict dtypes, no silent rank promotion, real MNIST located."""

import os
import pathlib

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Full fp32 in convolutions and matmuls on every backend (a GPU defaults to TF32), so the
# lowerings are compared at fp32 tolerances; the CPU computes in fp32 either way.
jax.config.update("jax_default_matmul_precision", "highest")

_REPO = pathlib.Path(__file__).resolve().parents[1]
# CI sets MNIST_DIR; a developer checkout finds the shared copy beside the repository.
os.environ.setdefault("MNIST_DIR", str(_REPO.parent / "shared" / "data" / "mnist"))
