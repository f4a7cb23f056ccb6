"""Receptive fields: size, jump and start per layer, the exact input positions a unit sees, and
the effective receptive field (Luo et al. 2016).

Coordinates are input pixel centres, 0..N-1 per axis; H and W are independent. A layer with
explicit geometry (kernel k, stride s, dilation d, padding p_begin before the input) maps

    k_eff = d (k - 1) + 1
    r_out = r_in + (k_eff - 1) j_in              (field size)
    j_out = j_in s                               (jump: input pixels between adjacent units)
    start_out = start_in + ((k_eff - 1) / 2 - p_begin) j_in   (centre of output unit 0)

from r = 1, j = 1, start = 0 at the input. Output unit o is centred on start + o j and its field
box spans (r - 1) / 2 either side (`field_box`). Identity layers (activations, batch norm,
dropout, flatten) change nothing; global pooling is one window over its whole input.

The box is a hull: a unit depends on a subset of it. `predicted_positions` gives that subset
exactly (holes left by stride > kernel or dilation, and positions reached only through padded
units, are left out); `measured_positions` measures it with jax.grad on the real network.
When the box lies inside the input it is exactly the bounding box of that subset; when it is
clipped by the border the subset's bounding box can be smaller (see `field_box`).

Models are duck-typed: anything with `.layers` (each with `.geometry()` and
`.output_shape(in_shape)`) and optionally `.names`; `cnn.nn.Sequential` is one. Shapes are NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np

from cnn.geometry import Geometry, Pair, effective_kernel, pair

Shape = tuple[int, ...]
FPair = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class RFRow:
    """One layer's output geometry; pairs are (H, W).

    geometry is the layer's explicit window over its input (padding ((top, bottom), (left,
    right))); in_hw / out_hw are the layer's spatial input and output sizes; output_shape is the
    full inferred output shape ((H, W) only for rows made by `propagate`).
    """

    name: str
    layer_type: str
    in_hw: Pair
    out_hw: Pair
    output_shape: Shape
    r: Pair
    j: Pair
    start: FPair
    geometry: Geometry


class Positions(NamedTuple):
    """The input positions one output unit depends on: sorted rows, sorted columns, and the mask.

    H and W separate, so the set is the product ys x xs, i.e. mask_HW = ys[:, None] & xs[None].
    """

    ys: np.ndarray
    xs: np.ndarray
    mask_HW: np.ndarray


# ----------------------------------------------------------------------------- the algebra
def _explicit(geometry: object, in_hw: Pair, name: str) -> tuple[Geometry, Pair]:
    if not isinstance(geometry, Geometry):
        raise TypeError(
            f"layer {name!r}: geometry() must return a cnn.geometry.Geometry, got"
            f" {type(geometry).__name__}"
        )
    explicit, out_hw = geometry.resolve(in_hw)
    # Validates what the dataclass does not (kernel, stride and dilation are positive pairs).
    for field in ("kernel", "stride", "dilation"):
        pair(getattr(explicit, field), f"layer {name!r}: {field}")
    if min(out_hw) < 1:
        raise ValueError(
            f"layer {name!r}: output would be empty ({out_hw[0]}x{out_hw[1]}) for an"
            f" {in_hw[0]}x{in_hw[1]} input with geometry {geometry}; use a larger input, more"
            " padding or a smaller kernel/stride"
        )
    return explicit, out_hw


def _advance(g: Geometry, r: Pair, j: Pair, start: FPair) -> tuple[Pair, Pair, FPair]:
    """(r, j, start) after one explicit window geometry, per axis."""
    k_eff = effective_kernel(g.kernel, g.dilation)
    pads = g.padding  # explicit ((top, bottom), (left, right))
    r_out = tuple(r[a] + (k_eff[a] - 1) * j[a] for a in (0, 1))
    j_out = tuple(j[a] * g.stride[a] for a in (0, 1))
    start_out = tuple(start[a] + ((k_eff[a] - 1) / 2 - pads[a][0]) * j[a] for a in (0, 1))
    return r_out, j_out, start_out  # type: ignore[return-value]


def _check_hw(in_hw: Sequence[int]) -> Pair:
    try:
        return pair(tuple(in_hw), "in_hw")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"in_hw must be a pair of positive ints (H, W), got {in_hw!r}") from None


def propagate(
    geometries: Sequence[Geometry], in_hw: Sequence[int], names: Sequence[str] | None = None
) -> list[RFRow]:
    """Rows for a plain list of Geometry objects (for users of the pure functions)."""
    hw = _check_hw(in_hw)
    names = [str(i) for i in range(len(geometries))] if names is None else list(names)
    if len(names) != len(geometries):
        raise ValueError(f"got {len(names)} names for {len(geometries)} geometries")
    rows, r, j, start = [], (1, 1), (1, 1), (0.0, 0.0)
    for name, g in zip(names, geometries, strict=True):
        explicit, out_hw = _explicit(g, hw, name)
        r, j, start = _advance(explicit, r, j, start)
        rows.append(RFRow(name, "Geometry", hw, out_hw, out_hw, r, j, start, explicit))
        hw = out_hw
    return rows


def _layers_and_names(model: Any) -> tuple[list[Any], list[str]]:
    layers = getattr(model, "layers", None)
    if layers is None or isinstance(layers, str | bytes) or not isinstance(layers, Sequence):
        raise TypeError(
            f"{type(model).__name__} has no sequence of layers: receptive_field needs a model"
            " with .layers (and optionally .names), e.g. cnn.nn.Sequential"
        )
    names = getattr(model, "names", None)
    if names is None:
        names = [f"{i}_{type(layer).__name__.lower()}" for i, layer in enumerate(layers)]
    return list(layers), list(names)


def table(model: Any, input_shape: Sequence[int]) -> list[RFRow]:
    """One row per layer of `model` (no row for the input, which is r = j = 1, start = 0)."""
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be NHWC (B, H, W, C), got {tuple(input_shape)}")
    layers, names = _layers_and_names(model)
    rows, hw, r, j, start = [], _check_hw(shape[1:3]), (1, 1), (1, 1), (0.0, 0.0)
    for name, layer in zip(names, layers, strict=True):
        for method in ("geometry", "output_shape"):
            if not callable(getattr(layer, method, None)):
                raise TypeError(
                    f"layer {name!r} ({type(layer).__name__}) has no {method}(): every layer"
                    " must provide geometry() -> cnn.geometry.Geometry and"
                    " output_shape(in_shape) -> shape"
                )
        explicit, out_hw = _explicit(layer.geometry(), hw, name)
        shape = tuple(int(n) for n in layer.output_shape(shape))
        if len(shape) == 4 and shape[1:3] != out_hw:
            raise ValueError(
                f"layer {name!r} ({type(layer).__name__}): output_shape() gives spatial size"
                f" {shape[1:3]} but geometry() gives {out_hw}; the layer is inconsistent"
            )
        r, j, start = _advance(explicit, r, j, start)
        rows.append(RFRow(name, type(layer).__name__, hw, out_hw, shape, r, j, start, explicit))
        hw = out_hw
    return rows


# ----------------------------------------------------------------------------- boxes and sets
def _index(out_index: Sequence[int], out_hw: Pair) -> Pair:
    """(oy, ox), negative indices counted from the end like Python; IndexError if outside."""
    if (
        not isinstance(out_index, Sequence)
        or len(out_index) != 2
        or not all(isinstance(o, int | np.integer) for o in out_index)
    ):
        raise TypeError(f"out_index must be a pair of ints (oy, ox), got {out_index!r}")
    out = []
    for o, n in zip(out_index, out_hw, strict=True):
        if not -n <= o < n:
            raise IndexError(f"out_index {tuple(out_index)} is outside the output {out_hw}")
        out.append(int(o) % n)
    return (out[0], out[1])


def centre_index(out_hw: Sequence[int]) -> Pair:
    """The centre output unit ((H - 1) // 2, (W - 1) // 2)."""
    return ((out_hw[0] - 1) // 2, (out_hw[1] - 1) // 2)


def field_box(
    row: RFRow, out_index: Sequence[int], in_hw: Sequence[int], *, clip: bool = True
) -> tuple[Pair, Pair]:
    """Inclusive input box ((top, bottom), (left, right)) of output unit (oy, ox) of `row`.

    Centre start + o j, half-width (r - 1) / 2, clipped to [0, N - 1] (clip=False: unclipped).
    An axis where the box misses the input entirely comes back empty, bottom < top. The box
    contains every position the unit depends on, and is their bounding box when unclipped.
    """
    oy, ox = _index(out_index, row.out_hw)
    hw = _check_hw(in_hw)
    box = []
    for a, o in ((0, oy), (1, ox)):
        lo = row.start[a] + o * row.j[a] - (row.r[a] - 1) / 2  # an integer: -sum(p j) + o j
        lo_i = int(round(lo))
        assert lo_i == lo, f"box edge {lo} is not an integer; row {row} is inconsistent"
        hi_i = lo_i + row.r[a] - 1
        if clip:
            lo_i, hi_i = max(lo_i, 0), min(hi_i, hw[a] - 1)
            if hi_i < lo_i:
                lo_i, hi_i = 0, -1
        box.append((lo_i, hi_i))
    return (box[0], box[1])


def _taps(out_idx: np.ndarray, g: Geometry, axis: int, n_in: int) -> np.ndarray:
    """Input indices read by output indices out_idx: o s - p_begin + t d, kept if inside."""
    k, s, d, p = g.kernel[axis], g.stride[axis], g.dilation[axis], g.padding[axis][0]
    idx = (out_idx[:, None] * s - p + np.arange(k)[None, :] * d).ravel()
    return np.unique(idx[(idx >= 0) & (idx < n_in)])


def back_project(rows: Sequence[RFRow], out_index: Sequence[int]) -> Positions:
    """Exact input positions that unit out_index of the last row depends on."""
    if not rows:
        raise ValueError("back_project needs at least one row (a model with layers)")
    oy, ox = _index(out_index, rows[-1].out_hw)
    sets = []
    for axis, o in ((0, oy), (1, ox)):
        idx = np.array([o], dtype=np.int64)
        for row in reversed(rows):
            idx = _taps(idx, row.geometry, axis, row.in_hw[axis])
        sets.append(idx)
    ys, xs = sets
    in_hw = rows[0].in_hw
    mask_HW = np.zeros(in_hw, dtype=bool)
    mask_HW[np.ix_(ys, xs)] = True
    return Positions(ys, xs, mask_HW)


def predicted_positions(
    model: Any, input_shape: Sequence[int], out_index: Sequence[int]
) -> Positions:
    """Exact input positions output unit (oy, ox) of `model` can depend on, from geometry alone."""
    return back_project(table(model, input_shape), out_index)


# ----------------------------------------------------------------------------- measurement
def _normal_inputs(key: jax.Array | None, shape: Shape) -> np.ndarray:
    """Standard normal float32 inputs drawn by numpy, seeded by the key's bits.

    numpy rather than jax.random: XLA compiles a threefry sampler per shape (seconds on CPU),
    and every model and input shape here is new.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    seed = [int(v) for v in np.asarray(key, dtype=np.uint32).ravel()]
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _fold_constants_in_parameterless_modules(next_fun, args, kwargs, context):
    """Flax interceptor: trace modules without parameters (pools, activations) with constants
    evaluated (jax.ensure_compile_time_eval).

    Workaround: `cnn.layers.max_pool` / `avg_pool` (strided or padded windows) build their
    reduce_window init value with jnp.array, a tracer under jit, and reduce_window then lowers
    to a primitive with no reverse-mode rule (jit(grad) fails). A concrete init gives the
    differentiable window sum / max. Modules with parameters are left alone: Flax's parameter
    shape check would otherwise evaluate (and compile) their initializers.
    """
    module = context.module
    if context.method_name == "__call__" and "params" not in module.variables:
        with jax.ensure_compile_time_eval():
            return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs)


def _unit_fn(model_ref: Callable[[], Any], channel: int | None):
    """f(x_BHWC, variables, index) -> one output unit (index = [oy, ox]) of example 0.

    channel None sums the unit's channels. The model is reached through model_ref (a weakref
    where possible) so that cached compilations do not keep it alive.
    """

    def unit(x_BHWC: jax.Array, variables: Any, index: jax.Array) -> jax.Array:
        model = model_ref()
        with flax.linen.intercept_methods(_fold_constants_in_parameterless_modules):
            y = model.apply(variables, x_BHWC, train=False)
        if y.ndim == 2:  # flattened (Flatten) or pooled (GlobalAvgPool): (B, H*W*C)
            out_hw = table(model, x_BHWC.shape)[-1].out_hw
            if y.shape[1] % (out_hw[0] * out_hw[1]):
                raise ValueError(f"output {y.shape} does not flatten an {out_hw} spatial map")
            y = y.reshape(y.shape[0], out_hw[0], out_hw[1], -1)
        if y.ndim != 4:
            raise ValueError(f"model output must be (B, H, W, C) or (B, N), got {y.shape}")
        y_C = y[0, index[0], index[1]]
        if channel is None:
            return jnp.sum(y_C)
        if not -y_C.shape[0] <= channel < y_C.shape[0]:
            raise IndexError(f"channel {channel} is outside the {y_C.shape[0]} output channels")
        return y_C[channel]

    return unit


# (id(model), channel) -> (weakref to the model, jitted mask function); entries leave with it.
_MASK_FNS: dict[tuple[int, int | None], tuple[Callable[[], Any], Callable[..., jax.Array]]] = {}


def _mask_fn(model: Any, channel: int | None) -> Callable[..., jax.Array]:
    """jit((x, variables, index) -> non-zero-gradient mask_HW), once per model and shape."""
    key = (id(model), channel)
    hit = _MASK_FNS.get(key)
    if hit is not None and hit[0]() is model:
        return hit[1]
    try:
        model_ref: Callable[[], Any] = weakref.ref(
            model, lambda _, fns=_MASK_FNS: fns.pop(key, None)
        )
    except TypeError:  # not weak-referenceable: compile for this call only
        model_ref = lambda: model  # noqa: E731
    grad = jax.grad(_unit_fn(model_ref, channel))

    # A one-off diagnostic on small inputs: compile fast rather than run fast.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def mask(x_BHWC: jax.Array, variables: Any, index: jax.Array) -> jax.Array:
        grad_BHWC = grad(x_BHWC, variables, index)
        return jnp.any(jnp.abs(grad_BHWC[0]) > 0, axis=-1)

    if isinstance(model_ref, weakref.ref):
        _MASK_FNS[key] = (model_ref, mask)
    return mask


def measured_positions(
    model: Any,
    variables: Any,
    input_shape: Sequence[int],
    out_index: Sequence[int],
    channel: int | None = 0,
    key: jax.Array | None = None,
) -> np.ndarray:
    """Input positions where one output unit's gradient is non-zero: a bool (H, W) mask.

    The unit is (oy, ox) at `channel` (None: summed over channels) of example 0, on a random
    normal input (seeded by key; default PRNGKey(0)), in eval mode. With random non-zero
    weights and activations whose slope never vanishes this is exactly `predicted_positions`;
    ReLU and max-pool pass gradient to only some inputs, a subset. Jitted once per model (and
    shape): further units of the same model cost no compilation.
    """
    shape = tuple(int(n) for n in input_shape)
    rows = table(model, shape)
    if not rows:
        raise ValueError("measured_positions needs a model with at least one layer")
    index = jnp.asarray(_index(out_index, rows[-1].out_hw), jnp.int32)
    x_BHWC = jnp.asarray(_normal_inputs(key, shape))
    return np.asarray(_mask_fn(model, channel)(x_BHWC, variables, index))


def effective_receptive_field(
    model: Any,
    variables: Any,
    input_shape: Sequence[int],
    key: jax.Array,
    num_samples: int = 16,
    channel: int | None = None,
) -> jax.Array:
    """Effective receptive field (Luo et al. 2016) of the centre output unit: an (H, W) map.

    |d unit / d input| summed over input channels, averaged over num_samples random normal
    inputs (seeded by key; vmapped, jitted), normalised to sum to 1. Zero outside
    `predicted_positions`.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    shape = tuple(int(n) for n in input_shape)
    rows = table(model, shape)
    if not rows:
        raise ValueError("effective_receptive_field needs a model with at least one layer")
    grad = jax.grad(_unit_fn(lambda: model, channel))

    @jax.jit
    def erf(variables: Any, x_NBHWC: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
        def one(x_BHWC: jax.Array) -> jax.Array:
            grad_BHWC = grad(x_BHWC, variables, index)
            return jnp.sum(jnp.abs(grad_BHWC[0]), axis=-1)

        mean_HW = jnp.mean(jax.vmap(one)(x_NBHWC), axis=0)
        total = jnp.sum(mean_HW)
        return mean_HW / total, total

    x_NBHWC = jnp.asarray(_normal_inputs(key, (num_samples, *shape)))
    index = jnp.asarray(centre_index(rows[-1].out_hw), jnp.int32)
    erf_HW, total = erf(variables, x_NBHWC, index)
    if not float(total) > 0:
        raise ValueError(
            "effective_receptive_field: the centre unit's gradient is zero everywhere (dead"
            " units or zero weights?); use random non-zero weights"
        )
    return erf_HW


# ----------------------------------------------------------------------------- invariants
def assert_covers(model: Any, input_shape: Sequence[int], *, exact: bool = False) -> None:
    """Asserts the centre output unit's field box covers every input pixel (per axis).

    exact=True asserts more: the unit depends on every input pixel (no holes, nothing lost to
    padding). Static (shapes only), so a model can call it at trace time.
    """
    rows = table(model, input_shape)
    if not rows:
        raise AssertionError(f"{type(model).__name__} has no layers: its field is one pixel")
    last, in_hw = rows[-1], rows[0].in_hw
    centre = centre_index(last.out_hw)
    box = field_box(last, centre, in_hw, clip=False)
    for a, axis in enumerate("HW"):
        if box[a][0] > 0 or box[a][1] < in_hw[a] - 1:
            raise AssertionError(
                f"{type(model).__name__}: the receptive field of the last layer {last.name!r}"
                f" ({last.layer_type}) does not cover the input along {axis}: r={last.r[a]},"
                f" centre unit sees [{box[a][0]}, {box[a][1]}] of input size {in_hw[a]}."
                " Add layers/pooling or dilation to grow the field"
            )
    if exact:
        mask_HW = back_project(rows, centre).mask_HW
        if not mask_HW.all():
            raise AssertionError(
                f"{type(model).__name__}: the centre unit of the last layer {last.name!r} depends"
                f" on only {int(mask_HW.sum())} of {mask_HW.size} input pixels (holes from stride"
                " > kernel or dilation, or padding); r={last.r}, input {in_hw}. Add layers/pooling"
                " or dilation to grow the field, or shrink strides/dilations to fill the holes"
            )


def assert_monotone(rows: Sequence[RFRow]) -> None:
    """Asserts the field size r never shrinks from one row to the next, per axis."""
    for prev, row in zip(rows, rows[1:], strict=False):
        if row.r[0] < prev.r[0] or row.r[1] < prev.r[1]:
            raise AssertionError(
                f"receptive field shrinks from r={prev.r} at {prev.name!r} to r={row.r} at"
                f" {row.name!r}; rows must come from one forward pass (table or propagate)"
            )
