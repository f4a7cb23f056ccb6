"""Receptive-field algebra against the real network: predicted position sets equal jax.grad's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import receptive_field as rf
from cnn.geometry import Geometry
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

SLOPED = ("leaky_relu", "tanh", "elu")  # gradient never exactly zero, unlike relu


def random_variables(model, input_shape, seed=0):
    """Variables of model.init's structure, filled by numpy (no per-shape threefry compile).

    Kernels N(0, 1/fan_in), biases and BN means N(0, 0.1^2), BN scales and variances U(0.5, 1.5).
    """
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            value = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, s.shape)
        else:
            value = 0.1 * rng.standard_normal(s.shape)
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def padding_choice(rng):
    kind = rng.integers(5)
    if kind == 0:
        return "VALID"
    if kind == 1:
        return "SAME"
    if kind == 2:
        return int(rng.integers(0, 3))
    if kind == 3:
        return (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
    return tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(2))


def random_layer(rng, channels):
    u = rng.random()
    if u < 0.5:
        k = int(rng.integers(1, 6))
        kernel = k if rng.random() < 0.7 else (k, int(rng.integers(1, 6)))
        return Conv(
            channels,
            kernel,
            stride=int(rng.integers(1, 4)),
            padding=padding_choice(rng),
            dilation=int(rng.integers(1, 4)),
        )
    if u < 0.65:
        pad = ["VALID", "SAME", 0, 1][int(rng.integers(4))]
        return AvgPool(int(rng.integers(2, 4)), int(rng.integers(1, 4)), pad)
    if u < 0.85:
        return Activation(SLOPED[int(rng.integers(len(SLOPED)))])
    return BatchNorm()


def random_stack(rng):
    """A stack with a non-empty output: (model, input_shape). Empty ones are drawn again."""
    while True:
        h = int(rng.integers(17, 33))
        w = h if rng.random() < 0.5 else int(rng.integers(17, 33))
        c = int(rng.integers(1, 4))
        layers = [random_layer(rng, c) for _ in range(int(rng.integers(2, 7)))]
        if not any(isinstance(layer, Conv) for layer in layers):
            layers.insert(int(rng.integers(len(layers) + 1)), Conv(c, 3, dilation=2))
        model = Sequential(layers)
        try:
            rf.table(model, (1, h, w, c))
        except ValueError:  # some layer's output would be empty
            continue
        return model, (1, h, w, c)


def describe(model):
    parts = []
    for layer in model.layers:
        fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}
        kept = {k: v for k, v in fields.items() if k not in ("parent", "name") and v is not None}
        shown = ", ".join(
            f"{k}={v!r}" for k, v in kept.items() if k not in ("kernel_init", "bias_init", "impl")
        )
        parts.append(f"{type(layer).__name__}({shown})")
    return " -> ".join(parts)


def bbox(mask_HW):
    ys, xs = np.nonzero(mask_HW)
    return ((ys.min(), ys.max()), (xs.min(), xs.max()))


def box_mask(box, in_hw):
    mask_HW = np.zeros(in_hw, dtype=bool)
    (t, b), (l, r) = box
    mask_HW[t : b + 1, l : r + 1] = True
    return mask_HW


def test_random_stacks_measured_equals_predicted():
    rng = np.random.default_rng(20240611)
    n_stacks, n_box_equal, n_holes, n_clipped = 0, 0, 0, 0
    for _ in range(60):
        model, shape = random_stack(rng)
        n_stacks += 1
        variables = random_variables(model, shape, seed=n_stacks)
        rows = rf.table(model, shape)
        in_hw, out_hw = shape[1:3], rows[-1].out_hw
        # The pure-function path agrees with the model path.
        pure = rf.propagate([layer.geometry() for layer in model.layers], in_hw)
        assert [(p.r, p.j, p.start, p.out_hw) for p in pure] == [
            (q.r, q.j, q.start, q.out_hw) for q in rows
        ]
        rf.assert_monotone(rows)
        corner = (int(rng.choice([0, -1])), int(rng.choice([0, -1])))
        channel = None if rng.random() < 0.3 else int(rng.integers(shape[-1]))
        for index in (rf.centre_index(out_hw), corner):
            what = f"{describe(model)} on {shape}, unit {index}, channel {channel}"
            predicted = rf.predicted_positions(model, shape, index)
            measured = rf.measured_positions(
                model, variables, shape, index, channel=channel, key=jax.random.PRNGKey(n_stacks)
            )
            assert measured.shape == in_hw
            np.testing.assert_array_equal(measured, predicted.mask_HW, err_msg=what)
            np.testing.assert_array_equal(
                predicted.mask_HW,
                np.outer(
                    np.isin(np.arange(in_hw[0]), predicted.ys),
                    np.isin(np.arange(in_hw[1]), predicted.xs),
                ),
            )
            box = rf.field_box(rows[-1], index, in_hw)
            assert not (measured & ~box_mask(box, in_hw)).any(), what  # inside the box, always
            raw = rf.field_box(rows[-1], index, in_hw, clip=False)
            inside = all(raw[a][0] >= 0 and raw[a][1] <= in_hw[a] - 1 for a in (0, 1))
            if inside:  # an unclipped box is exactly the bounding box of the measured set
                assert raw == box
                assert bbox(measured) == box, what
                n_box_equal += 1
                n_holes += int(measured.sum() < box_mask(box, in_hw).sum())
            else:
                n_clipped += 1
    assert n_stacks >= 50
    assert n_box_equal >= 50, n_box_equal
    assert n_holes >= 10, n_holes  # exact sets with holes inside the box were compared
    assert n_clipped >= 50, n_clipped  # and border units


def test_course_network_table():
    model = eip_session1_original()
    rows = rf.table(model, (1, 28, 28, 1))
    assert [row.r for row in rows] == [(3, 3)] * 4 + [(28, 28)] * 3
    assert [row.start for row in rows] == [(1.0, 1.0)] * 4 + [(13.5, 13.5)] * 3
    assert all(row.j == (1, 1) for row in rows)
    assert rows[-1].output_shape == (1, 10)
    assert rf.field_box(rows[-1], (0, 0), (28, 28)) == ((0, 27), (0, 27))
    rf.assert_covers(model, (1, 28, 28, 1), exact=True)
    rf.assert_monotone(rows)


def test_recurrences_by_hand():
    # conv k3 s2 p1 -> conv k3 d2 SAME -> avgpool 2/2 -> GAP, on 16 x 11.
    model = Sequential(
        [
            Conv(2, 3, stride=2, padding=1),
            Conv(2, 3, dilation=2, padding="SAME"),
            AvgPool(2),
            GlobalAvgPool(),
        ]
    )
    rows = rf.table(model, (1, 16, 11, 2))
    assert [row.out_hw for row in rows] == [(8, 6), (8, 6), (4, 3), (1, 1)]
    # r: 1 + 2*1 = 3; + 4*2 = 11; + 1*2 = 13; GAP over 4 (H) / 3 (W) with j = 4: + 3*4, + 2*4.
    assert [row.r for row in rows] == [(3, 3), (11, 11), (13, 13), (25, 21)]
    assert [row.j for row in rows] == [(2, 2), (2, 2), (4, 4), (16, 12)]
    # start: 0 + (1 - 1) = 0; + (2 - 2)*2 = 0; + (0.5 - 0)*2 = 1; + 1.5*4 = 7 (H), + 1*4 = 5 (W).
    assert [row.start for row in rows] == [(0.0, 0.0), (0.0, 0.0), (1.0, 1.0), (7.0, 5.0)]
    assert rows[-1].output_shape == (1, 2)
    assert rf.field_box(rows[-1], (0, 0), (16, 11), clip=False) == ((-5, 19), (-5, 15))
    variables = random_variables(model, (1, 16, 11, 2))
    measured = rf.measured_positions(model, variables, (1, 16, 11, 2), (0, 0), channel=1)
    predicted = rf.predicted_positions(model, (1, 16, 11, 2), (0, 0))
    np.testing.assert_array_equal(measured, predicted.mask_HW)
    assert predicted.mask_HW.all()  # the 8x6 conv map drops no pixel here


@pytest.mark.parametrize(
    "padding,stride", [("VALID", 1), ("SAME", 1), ("SAME", 2), (((2, 0), (1, 3)), 1)]
)
def test_two_3x3_see_exactly_what_one_5x5_sees(padding, stride):
    shape = (1, 13, 12, 2)
    # SAME: each 3x3 SAME; explicit: the 5x5's padding split between the two 3x3s.
    if isinstance(padding, tuple):
        first, second = ((1, 0), (1, 1)), ((1, 0), (0, 2))
    else:
        first = second = padding
    two = Sequential([Conv(2, 3, padding=first), Conv(2, 3, stride=stride, padding=second)])
    one = Sequential([Conv(2, 5, stride=stride, padding=padding)])
    rows_two, rows_one = rf.table(two, shape), rf.table(one, shape)
    last_two, last_one = rows_two[-1], rows_one[-1]
    assert (last_two.r, last_two.j, last_two.start) == (last_one.r, last_one.j, last_one.start)
    assert last_two.r == (5, 5) and last_two.out_hw == last_one.out_hw
    for oy in range(last_two.out_hw[0]):
        for ox in range(last_two.out_hw[1]):
            np.testing.assert_array_equal(
                rf.predicted_positions(two, shape, (oy, ox)).mask_HW,
                rf.predicted_positions(one, shape, (oy, ox)).mask_HW,
            )
    centre = rf.centre_index(last_two.out_hw)
    measured = rf.measured_positions(two, random_variables(two, shape), shape, centre)
    np.testing.assert_array_equal(measured, rf.predicted_positions(two, shape, centre).mask_HW)


def test_1x1_conv_leaves_the_field_unchanged():
    base = [Conv(2, 3, stride=2, dilation=2, padding=1), Activation("tanh")]
    shape = (1, 20, 17, 2)
    before = rf.table(Sequential(base), shape)[-1]
    after = rf.table(Sequential([*base, Conv(4, 1), BatchNorm(), Dropout(0.5)]), shape)
    for row in after[2:]:
        assert (row.r, row.j, row.start, row.out_hw) == (
            before.r,
            before.j,
            before.start,
            before.out_hw,
        )


def test_stride_larger_than_kernel_leaves_holes():
    model = Sequential([Conv(2, 2, stride=3), Activation("elu"), Conv(2, 3)])
    shape = (1, 20, 20, 1)
    rows = rf.table(model, shape)
    assert (rows[-1].r, rows[-1].j, rows[-1].start) == ((8, 8), (3, 3), (3.5, 3.5))
    predicted = rf.predicted_positions(model, shape, (1, 2))
    np.testing.assert_array_equal(predicted.ys, [3, 4, 6, 7, 9, 10])
    np.testing.assert_array_equal(predicted.xs, [6, 7, 9, 10, 12, 13])
    assert rf.field_box(rows[-1], (1, 2), (20, 20)) == ((3, 10), (6, 13))
    measured = rf.measured_positions(model, random_variables(model, shape), shape, (1, 2))
    np.testing.assert_array_equal(measured, predicted.mask_HW)
    with pytest.raises(AssertionError, match="holes"):
        rf.assert_covers(Sequential([Conv(1, 2, stride=3), Conv(1, 6)]), (1, 17, 17, 1), exact=True)
    rf.assert_covers(Sequential([Conv(1, 2, stride=3), Conv(1, 6)]), (1, 17, 17, 1))


def test_clipped_box_can_be_larger_than_the_set():
    # Taps at -1 (padding) and 2: the unit sees only pixel 2, the clipped box spans 0..2.
    model = Sequential([Conv(1, 2, dilation=3, padding=1)])
    shape = (1, 9, 9, 1)
    predicted = rf.predicted_positions(model, shape, (0, 0))
    np.testing.assert_array_equal(predicted.ys, [2])
    assert rf.field_box(rf.table(model, shape)[-1], (0, 0), (9, 9)) == ((0, 2), (0, 2))
    measured = rf.measured_positions(model, random_variables(model, shape), shape, (0, 0))
    np.testing.assert_array_equal(measured, predicted.mask_HW)


def test_unit_that_sees_only_padding_has_an_empty_set():
    model = Sequential([Conv(1, 1, padding=1), Activation("tanh"), Conv(1, 1, stride=2)])
    shape = (1, 6, 7, 1)
    rows = rf.table(model, shape)
    box = rf.field_box(rows[-1], (0, 1), (6, 7))
    assert box[0][1] < box[0][0] and box[1] == (1, 1)  # empty along H
    predicted = rf.predicted_positions(model, shape, (0, 1))
    assert predicted.ys.size == 0 and not predicted.mask_HW.any()
    measured = rf.measured_positions(model, random_variables(model, shape), shape, (0, 1))
    assert not measured.any()


def test_global_pool_and_flatten_see_everything():
    shape = (1, 9, 7, 2)
    gap = Sequential([Conv(3, 3, stride=2), Activation("tanh"), GlobalAvgPool()])
    rows = rf.table(gap, shape)
    assert rows[-1].out_hw == (1, 1) and rows[-1].r == (9, 7)
    v = random_variables(gap, shape)
    measured = rf.measured_positions(gap, v, shape, (0, 0), channel=2)
    np.testing.assert_array_equal(measured, rf.predicted_positions(gap, shape, (0, 0)).mask_HW)
    assert measured.all()
    flat = Sequential([Conv(3, 3, stride=2), Flatten(), Activation("tanh")])
    index = (1, 2)
    measured = rf.measured_positions(flat, random_variables(flat, shape), shape, index, channel=1)
    predicted = rf.predicted_positions(flat, shape, index)
    np.testing.assert_array_equal(measured, predicted.mask_HW)
    assert measured.sum() == 9


@pytest.mark.parametrize("nonlinearity", ["maxpool", "relu"])
def test_maxpool_and_relu_measured_is_a_subset(nonlinearity):
    shape = (1, 18, 18, 1)
    middle = MaxPool(3, 2) if nonlinearity == "maxpool" else Activation("relu")
    model = Sequential([Conv(4, 3), middle, Conv(4, 3), MaxPool(2)])
    variables = random_variables(model, shape)
    centre = rf.centre_index(rf.table(model, shape)[-1].out_hw)
    predicted = rf.predicted_positions(model, shape, centre).mask_HW
    measured = rf.measured_positions(model, variables, shape, centre, channel=None)
    assert measured.any()
    assert not (measured & ~predicted).any()
    assert measured.sum() < predicted.sum()  # strictly: max and relu route gradient selectively


def test_effective_receptive_field_of_3x3_stack():
    shape = (1, 21, 21, 2)
    model = Sequential([layer for _ in range(4) for layer in (Conv(8, 3), Activation("tanh"))])
    variables = random_variables(model, shape)
    erf_HW = rf.effective_receptive_field(model, variables, shape, jax.random.PRNGKey(3))
    assert erf_HW.shape == (21, 21)
    np.testing.assert_allclose(float(jnp.sum(erf_HW)), 1.0, rtol=1e-5)
    predicted = rf.predicted_positions(model, shape, rf.centre_index((13, 13))).mask_HW
    erf = np.asarray(erf_HW)
    assert (erf[~predicted] == 0).all() and (erf[predicted] > 0).all()
    (t, b), (l, r) = bbox(predicted)  # 9x9 around pixel 10
    assert (t, b, l, r) == (6, 14, 6, 14)
    edge = np.concatenate([erf[t, l : r + 1], erf[b, l : r + 1], erf[t:b, l], erf[t:b, r]])
    assert erf[10, 10] > 3 * edge.mean() and erf[10, 10] > edge.max()


def test_effective_receptive_field_has_the_holes():
    shape = (1, 19, 17, 1)
    model = Sequential([Conv(3, 2, stride=3), Activation("leaky_relu"), Conv(3, 3, dilation=2)])
    erf_HW = rf.effective_receptive_field(
        model, random_variables(model, shape), shape, jax.random.PRNGKey(0), num_samples=4
    )
    centre = rf.centre_index(rf.table(model, shape)[-1].out_hw)
    predicted = rf.predicted_positions(model, shape, centre).mask_HW
    erf = np.asarray(erf_HW)
    assert (erf[~predicted] == 0).all() and (erf[predicted] > 0).all()
    np.testing.assert_allclose(erf.sum(), 1.0, rtol=1e-5)


def test_assert_covers_names_layer_size_and_fix():
    model = Sequential([Conv(2, 3, name="c1"), Activation("tanh"), Conv(2, 3, name="last")])
    with pytest.raises(AssertionError) as info:
        rf.assert_covers(model, (1, 12, 5, 1))
    message = str(info.value)
    for part in ("'last'", "r=5", "input size 12", "along H", "add layers/pooling or dilation"):
        assert part.lower() in message.lower(), (part, message)
    rf.assert_covers(model, (1, 5, 5, 1), exact=True)
    with pytest.raises(AssertionError, match="along W"):
        rf.assert_covers(model, (1, 5, 6, 1))


def test_assert_monotone_rejects_a_shrinking_field():
    rows = rf.propagate([Geometry("window", kernel=(3, 3)), Geometry("identity")], (8, 8))
    rf.assert_monotone(rows)
    shrunk = [rows[0], dataclasses.replace(rows[1], r=(3, 2), name="bad")]
    with pytest.raises(AssertionError, match="shrinks.*'bad'"):
        rf.assert_monotone(shrunk)


def test_propagate_plain_geometries():
    geometries = [
        Geometry("window", kernel=(3, 1), stride=(2, 1), padding=((1, 1), (0, 0))),
        Geometry("identity"),
        Geometry("window", kernel=(2, 2), stride=(2, 2), dilation=(1, 3)),
        Geometry("global"),
    ]
    rows = rf.propagate(geometries, (10, 9), names=["a", "b", "c", "d"])
    assert [row.name for row in rows] == ["a", "b", "c", "d"]
    assert [row.out_hw for row in rows] == [(5, 9), (5, 9), (2, 3), (1, 1)]
    assert rows[2].r == (5, 4) and rows[2].j == (4, 2) and rows[2].start == (1.0, 1.5)
    assert rows[3].r == (9, 8) and rows[3].start == (3.0, 3.5)
    positions = rf.back_project(rows[:3], (1, 2))
    np.testing.assert_array_equal(positions.ys, [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(positions.xs, [4, 7])
    assert positions.mask_HW.shape == (10, 9) and positions.mask_HW.sum() == 10


class _NoGeometry:
    def output_shape(self, in_shape):
        return in_shape


class _BadGeometry(_NoGeometry):
    def geometry(self):
        return (3, 3)


class _Liar(_NoGeometry):
    def geometry(self):
        return Geometry("window", kernel=(3, 3))  # but output_shape keeps the size


class _Model:
    def __init__(self, *layers):
        self.layers = list(layers)


def test_clear_errors_for_bad_inputs():
    with pytest.raises(TypeError, match=r"layer '0__nogeometry' \(_NoGeometry\) has no geometry"):
        rf.table(_Model(_NoGeometry()), (1, 8, 8, 1))
    with pytest.raises(TypeError, match="'0__badgeometry'.*must return a cnn.geometry.Geometry"):
        rf.table(_Model(_BadGeometry()), (1, 8, 8, 1))
    with pytest.raises(ValueError, match="inconsistent"):
        rf.table(_Model(_Liar()), (1, 8, 8, 1))
    with pytest.raises(TypeError, match="has no sequence of layers"):
        rf.table(object(), (1, 8, 8, 1))
    with pytest.raises(ValueError, match="NHWC"):
        rf.table(Sequential([Conv(1, 3)]), (8, 8, 1))
    with pytest.raises(ValueError, match="'big'.*output would be empty"):
        rf.table(Sequential([Conv(1, 3, name="c"), Conv(1, 7, name="big")]), (1, 8, 8, 1))
    with pytest.raises(IndexError, match="outside the output"):
        rf.predicted_positions(Sequential([Conv(1, 3)]), (1, 8, 8, 1), (6, 0))
    with pytest.raises(TypeError, match="pair of ints"):
        rf.predicted_positions(Sequential([Conv(1, 3)]), (1, 8, 8, 1), 3)
    with pytest.raises(ValueError, match="kernel must be >= 1"):
        rf.propagate([Geometry("window", kernel=(0, 3))], (8, 8))
    with pytest.raises(ValueError, match="in_hw"):
        rf.propagate([Geometry("identity")], (8, 0))
    model = Sequential([Conv(2, 3)])
    with pytest.raises(IndexError, match="channel 5"):
        rf.measured_positions(model, random_variables(model, (1, 5, 5, 1)), (1, 5, 5, 1), (0, 0), 5)
