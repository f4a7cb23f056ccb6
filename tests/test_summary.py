"""Model summary: parameter and MAC counts by hand and from model.init, shapes from apply."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import model_summary as summary_lib
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


def course_network():
    return eip_session1_original()


def init_shapes(model, input_shape):
    """model.init's variables as shapes (jax.eval_shape: nothing is computed)."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def check_against_flax(model, input_shape):
    """Params equal model.init's; output shapes equal what apply returns, layer by layer."""
    rows = summary_lib.summary(model, input_shape, print_fn=None)
    variables = init_shapes(model, input_shape)
    assert sum(row.params for row in rows) == count(variables.get("params", {}))
    assert sum(row.non_trainable_params for row in rows) == count(variables.get("batch_stats", {}))
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    _, features = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True), variables, x)
    # eval_shape returns the features dict with sorted keys: compare by name.
    assert [row.name for row in rows] == list(model.names)
    assert {row.name: row.output_shape for row in rows} == {k: f.shape for k, f in features.items()}
    return rows


def test_course_network():
    lines = []
    rows = summary_lib.summary(course_network(), (1, 28, 28, 1), print_fn=lines.append)
    assert [row.params for row in rows] == [320, 0, 330, 0, 67_610, 0, 0]
    assert sum(row.params for row in rows) == 68_260
    assert [row.macs for row in rows] == [
        26 * 26 * 32 * 3 * 3 * 1,
        0,
        26 * 26 * 10 * 32,
        0,
        1 * 1 * 10 * 26 * 26 * 10,
        0,
        0,
    ]
    assert rows[-1].r == (28, 28) and rows[-1].output_shape == (1, 10)
    text = "\n".join(lines)
    assert "Total params: 68,260" in lines
    assert "Trainable params: 68,260" in lines
    assert "Non-trainable params: 0" in lines
    assert f"Total MACs (per example): {sum(row.macs for row in rows):,}" in lines
    assert "r=(28, 28)" in text and "Layer (type)" in text and "4_conv (Conv)" in text
    assert any(line.startswith(" 4_conv (Conv)") and "67,610" in line for line in lines)
    check_against_flax(course_network(), (1, 28, 28, 1))


def test_1x1_bottleneck_versus_direct_4x4():
    # 7x7x256 input, VALID: the 4x4 convs give 4x4 outputs. With bias.
    shape = (1, 7, 7, 256)
    bottleneck = Sequential([Conv(64, 1, name="reduce"), Conv(256, 4, name="expand")])
    direct = Sequential([Conv(256, 4, name="direct")])
    reduce, expand = summary_lib.summary(bottleneck, shape, print_fn=None)
    (one,) = summary_lib.summary(direct, shape, print_fn=None)
    assert reduce.params == 256 * 64 + 64 == 16_448
    assert expand.params == 4 * 4 * 64 * 256 + 256 == 262_400
    assert reduce.params + expand.params == 278_848
    assert one.params == 4 * 4 * 256 * 256 + 256 == 1_048_832
    # MACs per example: output positions x output channels x (kernel taps x input channels).
    assert reduce.macs == 7 * 7 * 64 * 256 == 802_816
    assert expand.macs == 4 * 4 * 256 * (4 * 4 * 64) == 4_194_304
    assert one.macs == 4 * 4 * 256 * (4 * 4 * 256) == 16_777_216
    assert (reduce.output_shape, expand.output_shape) == ((1, 7, 7, 64), (1, 4, 4, 256))
    check_against_flax(bottleneck, shape)
    check_against_flax(direct, shape)
    # Without bias: the bias terms go, the MACs stay.
    no_bias = Sequential([Conv(64, 1, use_bias=False), Conv(256, 4, use_bias=False)])
    rows = check_against_flax(no_bias, shape)
    assert [row.params for row in rows] == [16_384, 262_144]
    assert [row.macs for row in rows] == [802_816, 4_194_304]


def test_batchnorm_running_stats_are_non_trainable():
    model = Sequential(
        [Conv(8, 3, padding="SAME"), BatchNorm(), Activation("relu"), MaxPool(2), Dropout(0.1)]
    )
    lines = []
    rows = summary_lib.summary(model, (1, 10, 10, 3), print_fn=lines.append)
    bn = rows[1]
    assert (bn.params, bn.non_trainable_params, bn.macs) == (16, 16, 0)
    assert "Total params: 256" in lines  # 3*3*3*8 + 8 = 224, + 16 + 16
    assert "Trainable params: 240" in lines
    assert "Non-trainable params: 16" in lines
    assert any(line.startswith(" 1_batchnorm (BatchNorm)") and " 32 " in line for line in lines)
    check_against_flax(model, (1, 10, 10, 3))


def test_shapes_and_params_match_flax_on_several_models():
    models = [
        (Sequential([Conv(4, 3, stride=2, padding=1), AvgPool(3, 1, "SAME"), GlobalAvgPool()]), 3),
        (Sequential([Conv(6, (3, 5), dilation=(2, 1), groups=2), BatchNorm(), Flatten()]), 4),
        (Sequential([Conv(5, 2, padding=((0, 1), (2, 0))), MaxPool(2, 1), Activation("gelu")]), 1),
    ]
    for model, c in models:
        check_against_flax(model, (1, 15, 12, c))


def random_model(rng):
    layers, c, hw = [], int(rng.integers(1, 4)), [int(rng.integers(12, 25)) for _ in range(2)]
    input_shape = (1, *hw, c)
    for _ in range(int(rng.integers(1, 6))):
        u = rng.random()
        if u < 0.45:
            groups = int(rng.choice([1, 2])) if c % 2 == 0 else 1
            c = int(rng.integers(1, 4)) * groups
            layers.append(
                Conv(
                    c,
                    int(rng.integers(1, 4)),
                    stride=int(rng.integers(1, 3)),
                    padding=["VALID", "SAME", 1][int(rng.integers(3))],
                    dilation=int(rng.integers(1, 3)),
                    groups=groups,
                    use_bias=bool(rng.random() < 0.7),
                )
            )
        elif u < 0.6:
            pool = MaxPool if rng.random() < 0.5 else AvgPool
            layers.append(pool(int(rng.integers(2, 4)), int(rng.integers(1, 3)), "SAME"))
        elif u < 0.75:
            layers.append(BatchNorm())
        elif u < 0.9:
            layers.append(Activation(["relu", "tanh", "elu"][int(rng.integers(3))]))
        else:
            layers.append(Dropout(0.2))
    layers.append(GlobalAvgPool() if rng.random() < 0.3 else Flatten())
    return Sequential(layers), input_shape


def test_random_models_match_flax():
    rng = np.random.default_rng(7)
    checked = 0
    while checked < 20:
        model, shape = random_model(rng)
        try:
            summary_lib.rows(model, shape)
        except ValueError:  # an empty output
            continue
        check_against_flax(model, shape)
        checked += 1


def test_real_apply_agrees():
    # One real init and apply, not just shapes (constant kernels: no per-shape sampler compile).
    model = Sequential(
        [
            Conv(3, 3, padding=1, kernel_init="ones"),
            BatchNorm(),
            AvgPool(2),
            Conv(2, 2, kernel_init="ones"),
            Flatten(),
        ]
    )
    shape = (1, 8, 6, 2)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32))
    _, features = model.apply(variables, jnp.ones(shape, jnp.float32), return_features=True)
    rows = summary_lib.summary(model, shape, print_fn=None)
    assert [row.output_shape for row in rows] == [f.shape for f in features.values()]
    assert sum(row.params for row in rows) == count(variables["params"])
    assert sum(row.non_trainable_params for row in rows) == count(variables["batch_stats"])


def test_summary_rejects_models_without_geometry():
    class Bare:
        def output_shape(self, in_shape):
            return in_shape

    class Model:
        layers = [Bare()]

    with pytest.raises(TypeError, match="has no geometry"):
        summary_lib.summary(Model(), (1, 4, 4, 1), print_fn=None)
