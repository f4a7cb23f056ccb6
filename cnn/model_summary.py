"""A Keras-style model summary: shapes, parameters, MACs and receptive field per layer.

Duck-typed like `cnn.receptive_field`: a model with `.layers` (and optionally `.names`), each
layer with `geometry()` and `output_shape(in_shape)`. Counts per layer:

- params (trainable): `layer.num_params(in_shape)` where the layer has it (Conv, BatchNorm's
  scale and bias), else 0.
- non-trainable params: `layer.num_non_trainable_params(in_shape)` where defined, else a
  BatchNorm's running mean and variance (2 C, as Keras counts them), else 0.
- MACs: `layer.macs(in_shape)` where defined (Conv: multiply-accumulates per example), else 0;
  pooling, normalization and activations do no weight multiplies and are not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from cnn import receptive_field as rf
from cnn.geometry import Pair

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One layer: counts per example; r, j, start as in `cnn.receptive_field` ((H, W) pairs)."""

    name: str
    layer_type: str
    output_shape: Shape
    params: int
    non_trainable_params: int
    macs: int
    r: Pair
    j: Pair
    start: tuple[float, float]


def _count(layer: Any, method: str, in_shape: Shape) -> int:
    fn = getattr(layer, method, None)
    return int(fn(in_shape)) if callable(fn) else 0


def _non_trainable(layer: Any, in_shape: Shape) -> int:
    if callable(getattr(layer, "num_non_trainable_params", None)):
        return int(layer.num_non_trainable_params(in_shape))
    if type(layer).__name__ == "BatchNorm":  # running mean and variance, one each per channel
        return 2 * int(in_shape[-1])
    return 0


def rows(model: Any, input_shape: Sequence[int]) -> list[SummaryRow]:
    """The summary's rows, without printing."""
    rf_rows = rf.table(model, input_shape)
    out, in_shape = [], tuple(int(n) for n in input_shape)
    for layer, row in zip(model.layers, rf_rows, strict=True):
        out.append(
            SummaryRow(
                name=row.name,
                layer_type=row.layer_type,
                output_shape=row.output_shape,
                params=_count(layer, "num_params", in_shape),
                non_trainable_params=_non_trainable(layer, in_shape),
                macs=_count(layer, "macs", in_shape),
                r=row.r,
                j=row.j,
                start=row.start,
            )
        )
        in_shape = row.output_shape
    return out


def _pair(p: Sequence[Any]) -> str:
    return f"({p[0]:g}, {p[1]:g})" if isinstance(p[0], float) else f"({p[0]}, {p[1]})"


def format_summary(model: Any, input_shape: Sequence[int], summary_rows: Sequence[SummaryRow]):
    """The printed table, as a list of lines."""
    header = ("Layer (type)", "Output Shape", "Param #", "MACs", "RF r", "jump j", "start")
    cells = [
        (
            f"{row.name} ({row.layer_type})",
            str(row.output_shape),
            f"{row.params + row.non_trainable_params:,}",
            f"{row.macs:,}",
            _pair(row.r),
            _pair(row.j),
            _pair(row.start),
        )
        for row in summary_rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]

    def line(c: Sequence[str]) -> str:
        left = f" {c[0]:<{widths[0]}}   {c[1]:<{widths[1]}}"
        right = "".join(f"   {v:>{w}}" for v, w in zip(c[2:], widths[2:], strict=True))
        return left + right

    width = len(line(header)) + 1
    trainable = sum(row.params for row in summary_rows)
    frozen = sum(row.non_trainable_params for row in summary_rows)
    shape = tuple(int(n) for n in input_shape)
    lines = [f'Model: "{type(model).__name__}", input {shape}', "=" * width, line(header)]
    lines += ["=" * width, *(line(c) for c in cells), "=" * width]
    lines += [
        f"Total params: {trainable + frozen:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {frozen:,}",
        f"Total MACs (per example): {sum(row.macs for row in summary_rows):,}",
    ]
    if summary_rows:
        last = summary_rows[-1]
        lines.append(
            f"Final receptive field (H, W): r={_pair(last.r)} j={_pair(last.j)}"
            f" start={_pair(last.start)} on input {_pair(shape[1:3])}"
        )
    lines.append("=" * width)
    return lines


def summary(
    model: Any, input_shape: Sequence[int], *, print_fn: Callable[[str], Any] | None = print
) -> list[SummaryRow]:
    """Prints a Keras-style table (one print_fn call per line; None: silent) and returns rows.

    Param # is trainable plus non-trainable, per layer; the totals split them.
    """
    summary_rows = rows(model, input_shape)
    if print_fn is not None:
        for text in format_summary(model, input_shape, summary_rows):
            print_fn(text)
    return summary_rows
