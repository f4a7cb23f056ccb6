"""Training: a train state, one pure step, epochs run on the device, checkpoints and resume.

`train_step` is a pure function (loss, gradients, optax update, metrics). `make_train_steps`
jits it once around a `lax.scan` over a chunk of steps that gathers its batches from the
device-resident dataset, so a whole chunk (up to an epoch) is one dispatch. Buffers are donated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cnn import augment, data, models, optim, receptive_field
from cnn.checkpoint import Checkpointer, IncompatibleWorkdirError, check_workdir_config
from cnn.files import atomic_write_text
from cnn.nn import Activation, Sequential
from cnn.reporting import Reporter

Array = jax.Array
Metrics = dict[str, Array]


class ConfigError(ValueError):
    """A config value that cannot work."""


# Errors caused by the user's input or files: scripts print their message alone, no traceback.
USER_ERRORS = (data.MnistNotFoundError, data.MnistFileError, IncompatibleWorkdirError, ConfigError)
_CHOICES = {
    "model": tuple(models.MODELS),
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("constant", "onecycle", "cosine"),
    "data_source": ("idx", "tfds"),
}


def _not_a_choice(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    choices = ", ".join(map(repr, _CHOICES[key]))
    return ConfigError(f"config.{key}={config[key]!r} is not one of {choices}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad value and what would be valid."""
    for key, choices in _CHOICES.items():
        if config[key] not in choices:
            raise _not_a_choice(config, key)
    for key, low in (
        ("batch_size", 1),
        ("num_epochs", 0),
        ("steps_per_dispatch", 1),
        ("eval_batch_size", 1),
        ("train_examples", 0),
        ("test_examples", 0),
        ("keep_checkpoints", 1),
    ):
        if not isinstance(config[key], int) or config[key] < low:
            raise ConfigError(f"config.{key} must be an int >= {low}, got {config[key]!r}")
    for key in ("rotation_deg", "translation_px"):
        if config.augment[key] < 0:
            raise ConfigError(f"config.augment.{key} must be >= 0, got {config.augment[key]!r}")
    if not config.learning_rate > 0:
        raise ConfigError(f"config.learning_rate must be > 0, got {config.learning_rate!r}")


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: params, BN statistics, optimizer state, step and RNG key."""

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: Array  # raw uint32 key data, so checkpoints hold plain arrays


# ----------------------------------------------------------------------------- model pieces
def logits_model(model: Sequential) -> Sequential:
    """The model without a final softmax: losses are computed stably from logits.

    Dropping a parameter-free last layer keeps the parameter tree unchanged.
    """
    last = model.layers[-1]
    if isinstance(last, Activation) and last.fn in ("softmax", "log_softmax"):
        return Sequential(list(model.layers[:-1]))
    return model


def num_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """optax optimizer and its learning-rate schedule from the config."""
    total = max(config.num_epochs * steps_per_epoch, 1)
    lr = config.learning_rate
    if config.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif config.schedule == "onecycle":
        schedule = optax.cosine_onecycle_schedule(
            total, lr, pct_start=config.warmup_fraction, div_factor=config.onecycle_div
        )
    elif config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, int(config.warmup_fraction * total), total
        )
    else:
        raise _not_a_choice(config, "schedule")
    if config.optimizer == "adam":
        tx = optim.adam(schedule)
    elif config.optimizer == "adamw":
        tx = optim.adamw(schedule, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        tx = optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov)
    else:
        raise _not_a_choice(config, "optimizer")
    if config.optimizer != "adamw" and config.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx, schedule


def init_state(model: nn.Module, tx, config, image_shape) -> TrainState:
    """The initial state, built by one compiled function (op by op it takes seconds on CPU).

    Its random draws use threefry's non-partitionable mode: on CPU XLA compiles that in 0.8-1.2 s
    instead of 1.9-2.7 s (fast99, tiny). The params are those `model.init` gives under
    `jax.threefry_partitionable(False)`.
    """

    @jax.jit
    def init(key):
        init_key, state_key = jax.random.split(key)
        variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32))
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            key=state_key,
        )

    with jax.threefry_partitionable(False):
        return init(jax.random.PRNGKey(config.seed))


# ----------------------------------------------------------------------------- the step
def preprocess(images_BHWC: Array, key: Array, config) -> Array:
    """uint8 images -> normalized float32, augmented on device when the config asks."""
    x_BHWC = augment.normalize(images_BHWC)
    return augment.augment(
        key,
        x_BHWC,
        max_rotation_deg=config.augment.rotation_deg,
        max_translation_px=config.augment.translation_px,
        fill=augment.NORMALIZED_BLACK,
    )


def _loss_and_metrics(logits_BK, labels_B, mask_B, label_smoothing: float):
    num_classes = logits_BK.shape[-1]
    onehot_BK = jax.nn.one_hot(labels_B, num_classes, dtype=logits_BK.dtype)
    if label_smoothing:
        onehot_BK = optax.smooth_labels(onehot_BK, label_smoothing)
    loss_B = optax.softmax_cross_entropy(logits_BK, onehot_BK)
    correct_B = (jnp.argmax(logits_BK, -1) == labels_B).astype(jnp.float32)
    metrics = {
        "loss_sum": jnp.sum(loss_B * mask_B),
        "correct": jnp.sum(correct_B * mask_B),
        "count": jnp.sum(mask_B),
    }
    return metrics["loss_sum"] / jnp.maximum(metrics["count"], 1.0), metrics


def train_step(
    state: TrainState, batch: dict[str, Array], *, model: nn.Module, tx, config
) -> tuple[TrainState, Metrics]:
    """One optimization step on a batch {"image" uint8, "label" int32, "mask" float32}."""
    step_key = jax.random.fold_in(state.key, state.step)
    aug_key, dropout_key = jax.random.split(step_key)
    x_BHWC = preprocess(batch["image"], aug_key, config)
    mask_B = batch["mask"]

    def loss_fn(params):
        logits_BK, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x_BHWC,
            train=True,
            mask_B=mask_B,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        loss, metrics = _loss_and_metrics(logits_BK, batch["label"], mask_B, config.label_smoothing)
        return loss, (metrics, updates.get("batch_stats", {}))

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with float decays
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


def dispatch_steps(config, total_steps: int) -> int:
    """Training steps per device call: config.steps_per_dispatch, at most total_steps, >= 1."""
    return max(1, min(config.steps_per_dispatch, total_steps))


def assert_field_covers(model: nn.Module, input_shape) -> None:
    """Trace-time check that the last layer's receptive field covers the whole input."""
    try:
        receptive_field.assert_covers(model, input_shape)
    except AssertionError as e:
        raise ConfigError(
            f"{e}; or set config.require_full_field=False to train it anyway"
        ) from None


def gather_rows(x_N___: jax.Array, idx_B: jax.Array) -> jax.Array:
    """x[idx] as a gather of whole flattened rows (XLA CPU otherwise may pick a batch-minor
    layout for a gathered image batch, which is several times slower)."""
    return x_N___.reshape(x_N___.shape[0], -1)[idx_B].reshape(idx_B.shape + x_N___.shape[1:])


def make_train_steps(model: nn.Module, tx, config, max_traces: int = 1) -> Callable:
    """The one jitted training function: `steps(state, images, labels, idx_SB, mask_SB, valid_S)`.

    It scans `train_step` over S steps whose batches it gathers on device (images[idx]); steps
    with valid_S == 0 leave the state untouched, so every chunk has the same shape and compiles
    once. Returns (state, summed metrics). The state's buffers are donated.
    """

    traces = 0

    def steps(state, images_NHWC, labels_N, idx_SB, mask_SB, valid_S):
        nonlocal traces
        traces += 1
        if traces > max_traces:
            raise AssertionError(
                f"the training step was traced {traces} times (at most {max_traces} allowed):"
                " an argument changed shape or dtype between calls"
            )
        if config.get("require_full_field", False):
            assert_field_covers(model, (idx_SB.shape[1], *images_NHWC.shape[1:]))

        def body(state, xs):
            idx_B, mask_B, valid = xs
            batch = {
                "image": gather_rows(images_NHWC, idx_B),
                "label": labels_N[idx_B],
                "mask": mask_B,
            }

            def run(state):
                return train_step(state, batch, model=model, tx=tx, config=config)

            def skip(state):
                zero = jnp.zeros((), jnp.float32)
                return state, {"loss_sum": zero, "correct": zero, "count": zero}

            return jax.lax.cond(valid > 0, run, skip, state)

        state, metrics_S = jax.lax.scan(body, state, (idx_SB, mask_SB, valid_S))
        return state, jax.tree.map(jnp.sum, metrics_S)

    return jax.jit(steps, donate_argnums=(0,))


def make_eval(model: nn.Module, batch_size: int) -> Callable:
    """Jitted evaluation over a whole split in large batches: returns summed metrics."""

    def evaluate(params, batch_stats, images_NHWC, labels_N):
        n = images_NHWC.shape[0]
        steps = -(-n // batch_size)
        pad = steps * batch_size - n
        idx_SB = jnp.concatenate([jnp.arange(n), jnp.zeros((pad,), jnp.int32)]).reshape(
            steps, batch_size
        )
        mask_SB = (jnp.arange(steps * batch_size) < n).astype(jnp.float32).reshape(steps, -1)

        def body(carry, xs):
            idx_B, mask_B = xs
            x_BHWC = augment.normalize(images_NHWC[idx_B])
            logits_BK = model.apply(
                {"params": params, "batch_stats": batch_stats}, x_BHWC, train=False
            )
            _, metrics = _loss_and_metrics(logits_BK, labels_N[idx_B], mask_B, 0.0)
            return carry, metrics

        _, metrics_S = jax.lax.scan(body, None, (idx_SB, mask_SB))
        return jax.tree.map(jnp.sum, metrics_S)

    return jax.jit(evaluate)


# ----------------------------------------------------------------------------- the loop
def setup_compilation_cache(config) -> None:
    """Turns on JAX's persistent compilation cache unless the config says no."""
    if not config.compilation_cache:
        return
    cache = config.compilation_cache_dir or str(data.cache_dir() / "jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _subset(split: tuple[np.ndarray, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    return split if not n else (split[0][:n], split[1][:n])


def _summarize(metrics: dict[str, Any]) -> dict[str, float]:
    count = max(float(metrics["count"]), 1.0)
    return {"loss": float(metrics["loss_sum"]) / count, "acc": float(metrics["correct"]) / count}


def _host_value(fn: Callable, *args) -> float:
    with jax.transfer_guard("allow"), jax.numpy_dtype_promotion("standard"):
        return float(fn(*args))


@dataclasses.dataclass
class Timer:
    """Wall seconds by phase."""

    seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"data": 0.0, "compile": 0.0, "train": 0.0, "eval": 0.0}
    )

    def add(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - start
        return now


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains config's model in workdir, resuming from its latest checkpoint; returns the result."""
    t_start = time.perf_counter()
    timer = Timer()
    validate_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_workdir_config(workdir, config.to_dict())
    setup_compilation_cache(config)

    t = time.perf_counter()
    splits = data.load_mnist(config.data_dir or None, source=config.data_source)
    train_images, train_labels = _subset(splits["train"], config.train_examples)
    test_images, test_labels = _subset(splits["test"], config.test_examples)
    device_data = jax.device_put((train_images, train_labels, test_images, test_labels))
    n_train = len(train_labels)
    steps_per_epoch = data.steps_per_epoch(n_train, config.batch_size, config.drop_remainder)
    t = timer.add("data", t)

    model = models.get(config.model)
    train_model = logits_model(model)
    tx, schedule = make_optimizer(config, steps_per_epoch)
    state = init_state(train_model, tx, config, train_images.shape[1:])
    params = num_params(state.params)
    chunk = dispatch_steps(config, steps_per_epoch)
    n_chunks = -(-steps_per_epoch // chunk)

    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    start_epoch = checkpointer.latest_epoch()
    if start_epoch:
        state = checkpointer.restore(start_epoch, state)
    reporter = Reporter(workdir, config, start_epoch=start_epoch)

    train_steps = make_train_steps(train_model, tx, config)
    evaluate = make_eval(train_model, config.eval_batch_size)
    idx_SB0 = np.zeros((chunk, config.batch_size), np.int32)
    arg_specs = (
        state,
        *device_data[:2],
        idx_SB0,
        np.zeros((chunk, config.batch_size), np.float32),
        np.zeros((chunk,), np.int32),
    )
    compiled_steps = train_steps.lower(*arg_specs).compile()
    compiled_eval = evaluate.lower(state.params, state.batch_stats, *device_data[2:]).compile()
    t = timer.add("compile", t)

    def evaluate_state() -> dict[str, float]:
        metrics = compiled_eval(state.params, state.batch_stats, *device_data[2:])
        return _summarize(jax.device_get(metrics))

    test = {}
    with jax.transfer_guard("disallow"):
        for epoch in range(start_epoch + 1, config.num_epochs + 1):
            t_epoch = time.perf_counter()
            idx_SB, mask_SB = data.epoch_indices(
                config.seed, epoch, n_train, config.batch_size, config.drop_remainder
            )
            pad = n_chunks * chunk - steps_per_epoch
            idx_SB = np.concatenate([idx_SB, np.zeros((pad, config.batch_size), np.int32)])
            mask_SB = np.concatenate([mask_SB, np.zeros((pad, config.batch_size), np.float32)])
            valid_S = (np.arange(n_chunks * chunk) < steps_per_epoch).astype(np.int32)
            chunks = [  # explicit transfers: the loop runs under transfer_guard("disallow")
                jax.device_put((i_SB, m_SB, v_S))
                for i_SB, m_SB, v_S in zip(
                    idx_SB.reshape(n_chunks, chunk, -1),
                    mask_SB.reshape(n_chunks, chunk, -1),
                    valid_S.reshape(n_chunks, chunk),
                    strict=True,
                )
            ]
            totals = None
            reporter.start_epoch(epoch, steps_per_epoch)
            for c, chunk_args in enumerate(chunks):
                state, metrics = compiled_steps(state, *device_data[:2], *chunk_args)
                totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
                reporter.advance(min(chunk, steps_per_epoch - c * chunk))
            train = _summarize(jax.device_get(totals))
            t = timer.add("train", t)
            test = evaluate_state()
            t = timer.add("eval", t)
            seconds = time.perf_counter() - t_epoch
            reporter.end_epoch(
                epoch,
                train=train,
                test=test,
                seconds=seconds,
                images_per_s=n_train / seconds,
                lr=_host_value(schedule, epoch * steps_per_epoch),
            )
            checkpointer.save(epoch, state)
            t = time.perf_counter()

    if not test:  # nothing left to train: evaluate what the checkpoint holds
        test = evaluate_state()
        t = timer.add("eval", t)
    checkpointer.close()
    result = {
        "test_loss": test["loss"],
        "test_acc": test["acc"],
        "params": params,
        "epochs": config.num_epochs,
        "resumed_from_epoch": start_epoch,
        "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 3),
    }
    atomic_write_text(workdir / "result.json", json.dumps(result, indent=2) + "\n")
    reporter.finish(result)
    return result
