"""Training: smoke run on real MNIST, resume equality, determinism, retracing, errors."""

import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import models, native, train
from cnn.checkpoint import IncompatibleWorkdirError
from cnn.nn import Activation, BatchNorm, Conv, Dropout, GlobalAvgPool, MaxPool, Sequential
from cnn.receptive_field import assert_covers
from configs import base, default, eip_session1, eip_session1_original, fast99, tiny

_REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def small_config(jax_cache, **overrides):
    c = tiny.get_config()
    c.train_examples = 640
    c.test_examples = 300
    c.batch_size = 64
    c.num_epochs = 2
    c.steps_per_dispatch = 4  # 10 steps per epoch: 3 dispatches, the last one part-masked
    c.schedule = "constant"
    c.learning_rate = 3e-3
    c.augment.rotation_deg = 10.0
    c.progress = False
    c.tensorboard = False
    c.compilation_cache_dir = jax_cache
    for k, v in overrides.items():
        c[k] = v
    return c


def read_metrics(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(ln).items() if k not in ("seconds", "images_per_s")}
        for ln in lines
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, jax_cache):
    workdir = tmp_path_factory.mktemp("run_a")
    result = train.train_and_evaluate(small_config(jax_cache), workdir)
    return workdir, result


def test_smoke_one_epoch_real_mnist(tmp_path, jax_cache, capsys):
    c = fast99.get_config()
    c.train_examples = 4096
    c.test_examples = 1000
    c.progress = True
    c.tensorboard = True
    c.compilation_cache_dir = jax_cache
    result = train.train_and_evaluate(c, tmp_path)
    out = capsys.readouterr()
    assert "epoch   1/1: train loss" in out.out
    assert f"score: [{result['test_loss']:.4f}, {result['test_acc']:.4f}]" in out.out
    assert "epoch 1/1" in out.err  # the progress bar
    assert result["test_acc"] > 0.8, result
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved == result
    assert set(saved["seconds"]) == {"data", "compile", "train", "eval"}
    assert saved["params"] == train.num_params(
        jax.eval_shape(models.fast99().init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))[
            "params"
        ]
    )
    (record,) = read_metrics(tmp_path)
    assert record["epoch"] == 1 and 0 <= record["test_acc"] <= 1
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "1").is_dir()


def test_resume_after_kill_equals_uninterrupted(finished_run, tmp_path, jax_cache):
    workdir_a, result_a = finished_run
    # A run killed after writing epoch 2's metrics but before its checkpoint: only epoch 1's
    # checkpoint survives, and metrics.jsonl has a line the checkpoint does not back.
    shutil.copytree(workdir_a, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    (tmp_path / "result.json").unlink()
    result_b = train.train_and_evaluate(small_config(jax_cache), tmp_path)
    assert result_b["resumed_from_epoch"] == 1
    assert (result_b["test_loss"], result_b["test_acc"]) == (
        result_a["test_loss"],
        result_a["test_acc"],
    )
    assert read_metrics(tmp_path) == read_metrics(workdir_a)


def test_same_seed_same_metrics_and_other_seed_differs(finished_run, tmp_path, jax_cache):
    workdir_a, _ = finished_run
    train.train_and_evaluate(small_config(jax_cache), tmp_path / "same")
    assert read_metrics(tmp_path / "same") == read_metrics(workdir_a)
    train.train_and_evaluate(small_config(jax_cache, seed=1), tmp_path / "other")
    assert read_metrics(tmp_path / "other") != read_metrics(workdir_a)


def test_more_epochs_on_a_finished_run_continue_it(finished_run, tmp_path, jax_cache):
    workdir_a, result_a = finished_run
    shutil.copytree(workdir_a, tmp_path, dirs_exist_ok=True)
    again = train.train_and_evaluate(small_config(jax_cache), tmp_path)
    assert again["resumed_from_epoch"] == 2 and again["test_acc"] == result_a["test_acc"]
    more = train.train_and_evaluate(small_config(jax_cache, num_epochs=3), tmp_path)
    assert more["resumed_from_epoch"] == 2
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_incompatible_workdir_is_refused_and_kept(finished_run, jax_cache):
    workdir_a, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in workdir_a.rglob("*") if p.is_file()}
    with pytest.raises(IncompatibleWorkdirError, match="model: 'tiny' there, 'fast99' now"):
        train.train_and_evaluate(small_config(jax_cache, model="fast99"), workdir_a)
    after = {p: p.stat().st_mtime_ns for p in workdir_a.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("model", "resnet", "config.model='resnet' is not one of"),
        ("optimizer", "lion", "config.optimizer='lion'"),
        ("schedule", "step", "config.schedule='step'"),
        ("batch_size", 0, "config.batch_size must be an int >= 1"),
        ("learning_rate", 0.0, "config.learning_rate must be > 0"),
    ],
)
def test_bad_config_values_are_named(tmp_path, key, value, match):
    c = base.get_config()
    c[key] = value
    with pytest.raises(train.ConfigError, match=match):
        train.train_and_evaluate(c, tmp_path)
    assert not (tmp_path / "config.json").exists()


def _step_inputs(config, model, steps=3):
    tx, _ = train.make_optimizer(config, 10)
    state = train.init_state(model, tx, config, (28, 28, 1))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (256, 28, 28, 1), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (256,), dtype=np.int32))
    idx = jnp.asarray(rng.integers(0, 256, (steps, config.batch_size), dtype=np.int32))
    mask = jnp.ones((steps, config.batch_size), jnp.float32)
    return tx, state, images, labels, idx, mask


def small_net():
    """Conv, BN, dropout: all a step handles, cheap to compile."""
    return Sequential(
        [
            Conv(8, 3, stride=2),
            BatchNorm(),
            Activation("relu"),
            Dropout(0.1),
            Conv(10, 3, stride=2),
            GlobalAvgPool(),
        ]
    )


def test_train_step_traces_once(jax_cache):
    c = small_config(jax_cache, batch_size=16, require_full_field=False)  # r=27 of 28
    model = small_net()
    tx, state, images, labels, idx, mask = _step_inputs(c, model)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch):
        return train.train_step(state, batch, model=model, tx=tx, config=c)

    for i in range(3):
        batch = {"image": images[idx[i]], "label": labels[idx[i]], "mask": mask[i]}
        state, metrics = step(state, batch)
    assert int(state.step) == 3 and float(metrics["count"]) == 16.0

    steps = train.make_train_steps(model, tx, c)
    valid = jnp.ones((3,), jnp.int32)
    for _ in range(2):
        state, _ = steps(state, images, labels, idx, mask, valid)
    with pytest.raises(AssertionError, match="traced 2 times"):
        steps(state, images, labels, idx[:2], mask[:2], valid[:2])


def test_step_updates_batch_stats_and_eval_is_deterministic(jax_cache):
    c = small_config(jax_cache, batch_size=16, require_full_field=False)  # r=27 of 28
    model = small_net()
    tx, state, images, labels, idx, mask = _step_inputs(c, model, steps=1)
    batch = {"image": images[idx[0]], "label": labels[idx[0]], "mask": mask[0]}
    new, _ = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=c))(
        state, batch
    )
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.batch_stats, new.batch_stats)
    assert all(jax.tree.leaves(changed))
    evaluate = train.make_eval(model, 100)
    first = evaluate(new.params, new.batch_stats, images, labels)
    second = evaluate(new.params, new.batch_stats, images, labels)
    assert jax.tree.map(float, first) == jax.tree.map(float, second)
    assert float(first["count"]) == 256.0  # 3 eval batches of 100, the last one masked


def _params(model):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    return train.num_params(variables["params"])


def test_the_configs_networks():
    original = eip_session1_original.get_config()
    assert (original.model, original.batch_size, original.num_epochs) == (
        "eip_session1_original",
        32,
        10,
    )
    assert (original.optimizer, original.learning_rate, original.schedule) == (
        "adam",
        1e-3,
        "constant",
    )
    assert _params(models.eip_session1_original()) == 68_260

    improved = eip_session1.get_config()
    assert (improved.batch_size, improved.num_epochs, improved.optimizer) == (32, 10, "adam")
    assert improved.augment.rotation_deg == 0 and improved.augment.translation_px == 0
    net = models.eip_session1()
    # Only the session's concepts: convolutions (3x3, then 1x1 after the pool), one max-pool,
    # relu and softmax; no BN, dropout or dense layer.
    assert not any(isinstance(layer, BatchNorm | Dropout) for layer in net.layers)
    assert sum(isinstance(layer, MaxPool) for layer in net.layers) == 1
    kernels = [layer.kernel_size for layer in net.layers if isinstance(layer, Conv)]
    assert set(kernels[:2]) == {3} and kernels[2] == 1
    assert_covers(net, (1, 28, 28, 1))

    assert _params(models.tiny()) < 8_000
    # Its 24x24 layer: the native kernel where it builds, else the one measured fastest on CPU.
    assert [getattr(layer, "impl", None) for layer in models.tiny().layers[:4:3]] == [
        "auto",
        "direct" if jax.default_backend() == "cpu" and not native.available() else "auto",
    ]
    assert_covers(models.tiny(), (1, 28, 28, 1))
    assert_covers(models.fast99(), (1, 28, 28, 1))


_MEASURED = re.compile(r"Measured: ([\d,]+) params; score (\[[\d., ]+\]); wall ([^(\n]+?) \(")


@pytest.mark.parametrize(
    "module", [eip_session1_original, eip_session1, tiny, fast99], ids=lambda m: m.__name__
)
def test_config_docstring_figures_are_recorded_in_benchmarks(module):
    """Each config states its command, params, score and wall time, as BENCHMARKS.md has them."""
    name = module.__name__.rsplit(".", 1)[-1]
    doc = module.__doc__
    assert f"scripts/train.py --config configs/{name}.py --workdir" in doc
    match = _MEASURED.search(doc)
    assert match, f"configs/{name}.py: no 'Measured: N params; score [..]; wall T (' line"
    params, score, wall = match.groups()
    assert int(params.replace(",", "")) == _params(models.get(module.get_config().model))
    rows = [
        line
        for line in (_REPO / "BENCHMARKS.md").read_text().splitlines()
        if line.startswith(f"| `configs/{name}.py`")
    ]
    assert any(params in r and score in r and wall in r for r in rows), (name, rows)


def test_default_config_is_tiny():
    assert default.get_config().to_dict() == tiny.get_config().to_dict()


def _script(*args, env=None):
    cmd = [sys.executable, str(_REPO / "scripts" / "train.py"), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def test_train_script_end_to_end_and_its_errors(tmp_path, jax_cache):
    """The script as users run it: one epoch on a real subset, then user errors without traces."""
    common = [
        f"--config={_REPO / 'configs' / 'fast99.py'}",
        "--config.train_examples=1024",
        "--config.test_examples=500",
        "--config.progress=False",
        f"--config.compilation_cache_dir={jax_cache}",
    ]
    ok = _script(*common, f"--workdir={tmp_path / 'run'}")
    assert ok.returncode == 0, ok.stderr
    assert "epoch   1/1: train loss" in ok.stdout and "score: [" in ok.stdout
    assert json.loads((tmp_path / "run" / "result.json").read_text())["epochs"] == 1

    bad = _script(*common, "--config.model=resnet", f"--workdir={tmp_path / 'run'}")
    assert bad.returncode == 1
    assert "error: config.model='resnet' is not one of" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert (tmp_path / "run" / "result.json").exists()  # the finished run is untouched

    missing = _script(*common, f"--workdir={tmp_path / 'other'}", env={"MNIST_DIR": "/nonexistent"})
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "/nonexistent" in missing.stderr


def test_a_field_that_misses_the_input_is_refused_at_trace_time(tmp_path, jax_cache, monkeypatch):
    """Stride 4 with a 3x3 kernel skips the last row and column: the field misses them."""
    monkeypatch.setitem(
        models.MODELS, "tiny", lambda: Sequential([Conv(10, 3, stride=4), GlobalAvgPool()])
    )
    with pytest.raises(train.ConfigError, match="does not cover the input.*require_full_field"):
        train.train_and_evaluate(small_config(jax_cache), tmp_path / "a")
    result = train.train_and_evaluate(
        small_config(jax_cache, require_full_field=False, num_epochs=1), tmp_path / "b"
    )
    assert result["epochs"] == 1


def test_compiled_init_equals_eager_init(jax_cache):
    """init_state runs model.init under jit (seconds faster on CPU): the same bits as eager,
    with threefry's non-partitionable mode (which compiles faster)."""
    c = small_config(jax_cache)
    model = train.logits_model(models.get(c.model))
    tx, _ = train.make_optimizer(c, 10)
    state = train.init_state(model, tx, c, (28, 28, 1))
    with jax.threefry_partitionable(False):
        init_key, state_key = jax.random.split(jax.random.PRNGKey(c.seed))
        eager = model.init(init_key, jnp.zeros((1, 28, 28, 1), jnp.float32))
    chex.assert_trees_all_equal(state.params, eager["params"])
    chex.assert_trees_all_equal(state.batch_stats, eager["batch_stats"])
    np.testing.assert_array_equal(np.asarray(state.key), np.asarray(state_key))
