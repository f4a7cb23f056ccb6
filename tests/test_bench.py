"""Benchmark: the PyTorch translation matches ours (params, logits); numbers and the script."""

import json
import math
import os
import pathlib
import subprocess
import sys

# Shared CI runners: torch's OpenMP spin-waiting on busy cores slows it many-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402  (the dev extra installs it)

from cnn import benchmark, models, train  # noqa: E402
from cnn.nn import BatchNorm, Conv, Sequential  # noqa: E402
from configs import tiny  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _randomized_variables(model, key):
    """init() variables with BN statistics and affine params moved off their trivial values."""
    variables = model.init(key, jnp.zeros((1, *benchmark.IMAGE_SHAPE_HWC), jnp.float32))
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    noisy = [
        leaf + 0.2 * jax.random.uniform(k, leaf.shape, jnp.float32)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_torch_translation_matches(name):
    model = train.logits_model(models.get(name))
    variables = _randomized_variables(model, jax.random.PRNGKey(0))
    net = benchmark.to_torch(model)
    assert benchmark.torch_num_params(net) == train.num_params(variables["params"])

    benchmark.copy_to_torch(variables, model, net)
    net.eval()
    x_BHWC = jax.random.normal(jax.random.PRNGKey(1), (4, *benchmark.IMAGE_SHAPE_HWC))
    ours_BK = np.asarray(model.apply(variables, x_BHWC, train=False))
    with torch.no_grad():
        theirs_BK = net(torch.from_numpy(np.asarray(x_BHWC).transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(theirs_BK.numpy(), ours_BK, atol=1e-4, rtol=1e-4)


def test_flatten_of_a_map_matches():
    """A Flatten of a 2x2 map flattens in our NHWC order."""
    from cnn.nn import Flatten

    model = Sequential([Conv(3, 3, stride=2, padding=1), BatchNorm(), Conv(5, 13), Flatten()])
    variables = _randomized_variables(model, jax.random.PRNGKey(2))
    net = benchmark.to_torch(model).eval()
    benchmark.copy_to_torch(variables, model, net)
    x_BHWC = jax.random.normal(jax.random.PRNGKey(3), (2, *benchmark.IMAGE_SHAPE_HWC))
    with torch.no_grad():
        theirs = net(torch.from_numpy(np.asarray(x_BHWC).transpose(0, 3, 1, 2).copy())).numpy()
    ours = np.asarray(model.apply(variables, x_BHWC, train=False))
    assert ours.shape == (2, 20)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_untranslatable_padding_is_a_clear_error():
    model = Sequential([Conv(4, 3, padding=((0, 1), (0, 1)))])
    with pytest.raises(benchmark.TranslationError, match="asymmetric padding"):
        benchmark.to_torch(model)
    with pytest.raises(benchmark.TranslationError, match="'SAME' with stride"):
        benchmark.to_torch(Sequential([Conv(4, 3, stride=2, padding="SAME")]))


def _small_config():
    c = tiny.get_config()
    c.batch_size = 8
    c.steps_per_dispatch = 2
    return c


def _check(result, peer):
    for key in ("images_per_s", "gflops", "peak_fraction", "compile_s", "peak_rss_mb"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    tiny_params = jax.eval_shape(
        models.tiny().init, jax.random.PRNGKey(0), jnp.zeros((1, *benchmark.IMAGE_SHAPE_HWC))
    )["params"]
    assert result["params"] == train.num_params(tiny_params) and result["macs"] > 0
    assert result["batch_size"] == 8 and result["steps"] == 4 and result["config"] == "tiny"
    assert result["device"] and result["platform"]
    assert result["peak_fraction"] == result["gflops"] / result["peak_gflops"]
    assert result["nominal_peak_fraction"] == result["gflops"] / benchmark.NOMINAL_PEAK_GFLOPS
    if peer:
        for key in ("peer_images_per_s", "ratio"):
            assert math.isfinite(result[key]) and result[key] > 0, key
        assert result["peer_device"] == ("cuda" if result["platform"] == "gpu" else "cpu")
    else:
        assert result["peer_images_per_s"] is None and result["ratio"] is None


@pytest.mark.parametrize("peer", [None, "torch"])
def test_benchmark_numbers(peer):
    result = benchmark.benchmark(_small_config(), steps=3, warmup=1, peer=peer)
    _check(result, peer)
    assert set(benchmark.REQUIRED_KEYS) <= set(result)


def test_peer_runs_in_rounds_between_our_chunks(monkeypatch):
    """Warm-up, then one round of the peer's steps after each round of our timed chunks."""
    calls = []
    real_run = benchmark.TorchPeer.run

    def run(self, steps):
        calls.append(("peer", steps))
        return real_run(self, steps)

    monkeypatch.setattr(benchmark.TorchPeer, "run", run)
    real_make = train.make_train_steps

    def make_train_steps(*a, **k):
        jitted = real_make(*a, **k)

        class Counting:
            def lower(self, *args):
                compiled = jitted.lower(*args).compile()

                class Lowered:
                    def compile(self):
                        def call(*xs):
                            calls.append(("ours", 2))
                            return compiled(*xs)

                        return call

                return Lowered()

        return Counting()

    monkeypatch.setattr(train, "make_train_steps", make_train_steps)
    config = _small_config()
    result = benchmark.benchmark(config, steps=8, warmup=2, peer="torch")
    assert result["steps"] == 8 and result["peer_rounds"] == 4
    assert len(result["round_ratios"]) == 4
    assert result["ratio_median"] == pytest.approx(float(np.median(result["round_ratios"])))
    # our warm-up chunk, the peer's warm-up, then four rounds of one chunk (2 steps) each
    assert calls == [("ours", 2), ("peer", 2)] + [("ours", 2), ("peer", 2)] * 4
    calls.clear()  # peer_rounds=1: all of ours, then all of the peer's
    result = benchmark.benchmark(config, steps=8, warmup=2, peer="torch", peer_rounds=1)
    assert result["peer_rounds"] == 1 and len(result["round_ratios"]) == 1
    assert result["round_ratios"][0] == pytest.approx(result["ratio"])
    assert calls == [("ours", 2), ("peer", 2)] + [("ours", 2)] * 4 + [("peer", 8)]


def test_cpu_peer_starts_after_a_large_free(monkeypatch):
    freed, real = [], benchmark.free_large_block
    monkeypatch.setattr(benchmark, "free_large_block", lambda: freed.append(True))
    config = _small_config()
    model = train.logits_model(models.get(config.model))
    images, labels = benchmark.synthetic_mnist(n=16)
    benchmark.TorchPeer(config, model, images, labels, "cpu")
    assert freed == [True]
    assert 16 << 20 <= benchmark.LARGE_BLOCK_BYTES < 32 << 20
    real(1 << 20)  # runs anywhere: an allocation and a free


def test_torch_peer_device_follows_ours(monkeypatch):
    assert benchmark.torch_device("cpu") == "cpu" and benchmark.torch_device("tpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(benchmark.ArgumentError, match="torch has no CUDA"):
        benchmark.torch_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert benchmark.torch_device("gpu") == "cuda"


def test_peak_is_measured_unless_given(monkeypatch):
    runs = iter([321.0, 250.0, 100.0, 321.0])  # a slow phase in either measurement
    monkeypatch.setattr(benchmark, "matmul_gflops", lambda: next(runs))
    for expected_runs in ([321.0, 250.0], [100.0, 321.0]):
        measured = benchmark.benchmark(_small_config(), steps=2, warmup=0)
        assert measured["peak_source"].startswith("measured")
        assert measured["matmul_gflops_runs"] == expected_runs
        assert measured["peak_gflops"] == measured["matmul_gflops"] == 321.0
        assert measured["peak_fraction"] == measured["gflops"] / 321.0
    monkeypatch.setattr(benchmark, "matmul_gflops", lambda: 321.0)
    given = benchmark.benchmark(_small_config(), steps=2, warmup=0, peak_gflops=400.0)
    assert given["peak_source"] == "given" and given["peak_gflops"] == 400.0
    assert given["matmul_gflops"] == 321.0 and given["peak_fraction"] == given["gflops"] / 400.0
    with pytest.raises(benchmark.ArgumentError, match="peak_gflops must be > 0"):
        benchmark.benchmark(_small_config(), steps=2, peak_gflops=0.0)


def test_matmul_gflops_counts_two_flops_per_multiply_add():
    ticks = iter([0.0, 2.0, 10.0, 11.0, 20.0, 23.0])  # the calls take 2 s, 1 s and 3 s
    assert benchmark.matmul_gflops(n=100, repeats=3, clock=lambda: next(ticks)) == 2 * 100**3 / 1e9
    assert benchmark.matmul_gflops(n=64, repeats=2) > 0


def test_host_cpu_names_the_processor():
    cpu = benchmark.host_cpu()
    assert isinstance(cpu, str) and cpu


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--steps=0", "need steps >= 1"),
        ("--peak_gflops=-1", "peak_gflops must be > 0"),
        ("--peer_rounds=0", "peer_rounds must be >= 1"),
    ],
)
def test_script_bad_arguments_are_one_line_errors(flag, message):
    cmd = [
        sys.executable,
        str(_REPO / "scripts" / "bench.py"),
        f"--config={_REPO / 'configs' / 'tiny.py'}",
        flag,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"error: {message}" in out.stderr


def test_script_json():
    cmd = [
        sys.executable,
        str(_REPO / "scripts" / "bench.py"),
        f"--config={_REPO / 'configs' / 'tiny.py'}",
        "--peer=torch",
        "--json",
        "--steps=2",
        "--warmup=1",
        "--config.batch_size=8",
        "--config.steps_per_dispatch=2",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout)
    for key in benchmark.REQUIRED_KEYS:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["config"].endswith("tiny.py --config.batch_size=8 --config.steps_per_dispatch=2")


def test_time_conv_impls_times_each_applicable_lowering():
    ticks = iter(float(t) for t in range(100))  # every timed call takes 1 s: the best is 1 s too
    times = benchmark.time_conv_impls(
        (2, 6, 6, 3), (3, 3, 3, 4), padding=1, steps=4, repeats=2, clock=lambda: next(ticks)
    )
    assert set(times) == {"auto", "xla", "im2col", "direct", "native"}  # not dense, pointwise
    assert all(ms == 1000.0 / 4 for ms in times.values())
    first_layer = benchmark.time_conv_impls(
        (2, 5, 5, 1), (5, 5, 1, 2), impls=("dense",), input_grad=False, repeats=1
    )
    assert list(first_layer) == ["dense"] and first_layer["dense"] > 0


def test_timed_conv_loss_gradients_depend_on_the_kernel():
    # A kernel gradient that does not depend on w is loop-invariant in the timed scan when the
    # input is fixed (input_grad=False): XLA hoists it and the "step" times nothing.
    k_x, k_w, k_t = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k_x, (2, 6, 6, 1))
    w = jax.random.normal(k_w, (3, 3, 1, 4))
    loss = benchmark.conv_loss("im2col", "VALID", jax.random.normal(k_t, (2, 4, 4, 4)))
    dw_at = jax.grad(loss, argnums=1)
    assert not np.allclose(dw_at(x, w), dw_at(x, 2 * w))
    dx_at = jax.grad(loss, argnums=0)
    assert not np.allclose(dx_at(x, w), dx_at(2 * x, w))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"impls": ("pointwise",)}, "impl='pointwise' needs a 1x1 kernel"),
        ({"padding": "FULL"}, "padding string must be 'VALID' or 'SAME'"),
        ({"steps": 0}, "need steps >= 1"),
    ],
)
def test_time_conv_impls_bad_arguments(kwargs, message):
    with pytest.raises(benchmark.ArgumentError, match=message):
        benchmark.time_conv_impls((2, 6, 6, 3), (3, 3, 3, 4), **kwargs)


def test_time_conv_impls_bad_shapes():
    with pytest.raises(benchmark.ArgumentError, match="input channels"):
        benchmark.time_conv_impls((2, 6, 6, 3), (3, 3, 2, 4))


def test_conv_script_json_and_errors():
    script = str(_REPO / "scripts" / "bench_conv.py")
    cmd = [sys.executable, script, "--x=2,6,6,3", "--w=3,3,3,4", "--impls=im2col,direct"]
    out = subprocess.run(
        [*cmd, "--json", "--repeats=1"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result["ms_per_step"]) == {"im2col", "direct"} and result["w"] == [3, 3, 3, 4]
    bad = subprocess.run(
        [*cmd[:2], "--x=2,6,6", "--w=3,3,3,4"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "error: --x needs four positive integers" in bad.stderr
