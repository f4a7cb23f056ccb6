"""Spatial geometry of a layer: kernel, stride, padding, dilation, and the output size they give.

One home for the arithmetic that shape inference (`cnn.layers`) and the receptive-field algebra
(`cnn.receptive_field`) share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

Pair = tuple[int, int]
Pads = tuple[Pair, Pair]
# "VALID", "SAME", an int (all sides), ((top, bottom), (left, right)), or (pad_h, pad_w).
PaddingLike = str | int | Sequence[int] | Sequence[Sequence[int]]


def pair(value: int | Sequence[int], name: str) -> Pair:
    """An int or a pair of positive ints, as a pair."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value, value)
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        out = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return out


def effective_kernel(kernel: Pair, dilation: Pair) -> Pair:
    """Extent of a dilated kernel: d (k - 1) + 1 per axis."""
    return (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)


def resolve_padding(
    padding: PaddingLike, in_hw: Pair, kernel: Pair, stride: Pair, dilation: Pair = (1, 1)
) -> Pads:
    """Explicit ((top, bottom), (left, right)) padding for an input of size in_hw.

    "SAME" follows `lax.conv_general_dilated`: output ceil(in / stride), extra pad at the end.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            k_eff = effective_kernel(kernel, dilation)
            pads = []
            for n, k, s in zip(in_hw, k_eff, stride, strict=True):
                out = -(-n // s)
                total = max((out - 1) * s + k - n, 0)
                pads.append((total // 2, total - total // 2))
            return (pads[0], pads[1])
        raise ValueError(f"padding string must be 'VALID' or 'SAME', got {padding!r}")
    if isinstance(padding, int) and not isinstance(padding, bool):
        out_pads: Pads = ((padding, padding), (padding, padding))
    elif isinstance(padding, Sequence) and len(padding) == 2:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in padding):
            ph, pw = padding  # type: ignore[misc]
            out_pads = ((int(ph), int(ph)), (int(pw), int(pw)))
        elif all(isinstance(p, Sequence) and len(p) == 2 for p in padding):
            (t, b), (l, r) = padding  # type: ignore[misc]
            out_pads = ((int(t), int(b)), (int(l), int(r)))
        else:
            raise ValueError(_padding_error(padding))
    else:
        raise ValueError(_padding_error(padding))
    if min(min(p) for p in out_pads) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return out_pads


def _padding_error(padding: object) -> str:
    return (
        "padding must be 'VALID', 'SAME', an int, (pad_h, pad_w) or ((top, bottom), (left, right)),"
        f" got {padding!r}"
    )


def output_hw(in_hw: Pair, kernel: Pair, stride: Pair, pads: Pads, dilation: Pair = (1, 1)) -> Pair:
    """Output size floor((n + pads - k_eff) / s) + 1 per axis; 0 if the kernel does not fit."""
    k_eff = effective_kernel(kernel, dilation)
    out = []
    for n, k, s, (lo, hi) in zip(in_hw, k_eff, stride, pads, strict=True):
        span = n + lo + hi - k
        out.append(span // s + 1 if span >= 0 else 0)
    return (out[0], out[1])


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a layer does to space: a sliding window, nothing (identity), or everything (global)."""

    kind: Literal["window", "identity", "global"] = "identity"
    kernel: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: PaddingLike = "VALID"
    dilation: Pair = (1, 1)

    def resolve(self, in_hw: Pair) -> tuple[Geometry, Pair]:
        """This geometry as an explicit window over an input of size in_hw, and its output size."""
        if self.kind == "identity":
            return Geometry("window", padding=((0, 0), (0, 0))), in_hw
        if self.kind == "global":
            return Geometry("window", kernel=in_hw, stride=in_hw, padding=((0, 0), (0, 0))), (1, 1)
        pads = resolve_padding(self.padding, in_hw, self.kernel, self.stride, self.dilation)
        explicit = dataclasses.replace(self, padding=pads)
        return explicit, output_hw(in_hw, self.kernel, self.stride, pads, self.dilation)
