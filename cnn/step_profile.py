"""Where a compiled step's time goes: the profiler's op events, classified by the optimized HLO.

`profile_compiled(compiled, args, steps, layer_names)` runs a compiled function once under
`jax.profiler` and returns a `StepProfile`: per step, the wall time, the time some op was running
(`busy_ms`; the rest is runtime overhead: dispatch, synchronization, the profiler's own cost),
and the op time split by kind and by layer. Kinds:

- "matmul/conv": dots, convolutions and custom calls, alone or in a kernel library's fusion
  (XNNPACK/YNNPACK/oneDNN): the part that can be compute-bound;
- "elementwise/reduce": the other loops (elementwise maps, reductions), bound by memory traffic;
- "data movement": copies, transposes, pads, concatenations, slices and gathers, alone or fused.

An op's time runs from its start to its completion (XLA's CPU runtime marks both: see
`_op_intervals`); while k ops run at once, each is charged 1/k of that time, so the op times
add up to `busy_ms`. Layers are read from the ops' `op_name` metadata (`layers_N`, as
`cnn.nn.Sequential` names its children; "bwd" where the op belongs to the backward pass); in
nested `Sequential`s the innermost index counts, and explicitly named layers count as outside
the layers.
Measured with XLA's CPU runtime; on other backends the events may not carry HLO names.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import pathlib
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax

LIBRARY, FUSED, MOVEMENT, CONTROL = "matmul/conv", "elementwise/reduce", "data movement", "control"
KINDS = (LIBRARY, FUSED, MOVEMENT)
OUTSIDE_LAYERS = "outside the layers (loss, optimizer, augmentation, batch gather)"

_LIBRARY_OPS = frozenset({"dot", "convolution", "custom-call"})
_CONTROL_OPS = frozenset({"while", "conditional", "call", "async-start", "async-done"})
_MOVEMENT_OPS = frozenset(
    {
        "copy",
        "transpose",
        "pad",
        "concatenate",
        "slice",
        "dynamic-slice",
        "dynamic-update-slice",
        "gather",
        "scatter",
        "reverse",
        "broadcast",
        "bitcast",
        "reshape",
        "iota",
        "tuple",
        "get-tuple-element",
        "parameter",
        "constant",
    }
)
_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"(?:ENTRY\s+)?%([\w.\-]+) \(.*\{\s*$")
_LAYER = re.compile(r"layers_(\d+)")


@dataclasses.dataclass(frozen=True)
class Op:
    """One instruction of the optimized HLO: its kind and the layer and pass it belongs to."""

    kind: str
    layer: int | None
    backward: bool


@dataclasses.dataclass(frozen=True)
class StepProfile:
    """Milliseconds per step; see the module docstring."""

    steps: int
    wall_ms: float
    busy_ms: float
    kind_ms: dict[str, float]
    kind_busy_ms: dict[str, float]  # the time some op of the kind was running
    layer_ms: dict[str, float]
    top_ops: list[tuple[str, str, float]]  # (HLO name, kind, ms per step), the costliest first

    @property
    def op_ms(self) -> float:
        return sum(self.kind_ms.values())

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "op_ms": self.op_ms}


def _opcode(rest: str) -> str:
    """The opcode of an instruction, given what follows ' = ' (a shape, then `opcode(`)."""
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rest = rest[i + 1 :]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    m = re.match(r"\s*([a-z][a-z0-9\-]*)\(", rest)
    return m.group(1) if m else ""


def hlo_ops(hlo_text: str) -> dict[str, Op]:
    """Every instruction of an optimized HLO module's text, by name."""
    opcodes: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    current = None
    for line in hlo_text.splitlines():
        comp = _COMPUTATION.match(line)
        if comp:
            current = comp.group(1)
            continue
        inst = _INSTRUCTION.match(line)
        if inst and current is not None:
            opcodes[current].append((inst.group(1), _opcode(inst.group(2)), inst.group(2)))

    def codes(computation: str) -> set[str]:
        return {code for _, code, _ in opcodes.get(computation, [])}

    ops = {}
    for instructions in opcodes.values():
        for name, code, rest in instructions:
            if code in _CONTROL_OPS:
                kind = CONTROL
            elif code in _LIBRARY_OPS:
                kind = LIBRARY
            elif code == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", rest)
                inside = codes(called.group(1)) if called else set()
                if inside & _LIBRARY_OPS:
                    kind = LIBRARY
                elif inside and inside <= _MOVEMENT_OPS:
                    kind = MOVEMENT
                else:
                    kind = FUSED
            elif code in _MOVEMENT_OPS:
                kind = MOVEMENT
            else:
                kind = FUSED
            op_name = re.search(r'op_name="([^"]*)"', rest)
            layers = _LAYER.findall(op_name.group(1)) if op_name else []
            backward = bool(op_name) and "transpose(" in op_name.group(1)
            ops[name] = Op(kind, int(layers[-1]) if layers else None, backward)
    return ops


def _shared_us(intervals: Sequence[tuple[str, float, float]]) -> list[float]:
    """Each interval's share of the time: while k ops run at once, each gets 1/k of it.

    The shares add up to the union of the intervals (the time some op was running).
    """
    spans = [(i, start, stop) for i, (_, start, stop) in enumerate(intervals) if stop > start]
    edges = sorted(
        [(start, 1, i) for i, start, _ in spans] + [(stop, -1, i) for i, _, stop in spans],
        key=lambda edge: (edge[0], edge[1]),
    )
    shares = [0.0] * len(intervals)
    active: set[int] = set()
    last = None
    for t, change, i in edges:
        if active and last is not None and t > last:
            for j in active:
                shares[j] += (t - last) / len(active)
        last = t
        if change > 0:
            active.add(i)
        else:
            active.discard(i)
    return shares


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _op_intervals(
    events: Sequence[Mapping[str, Any]], ops: Mapping[str, Op]
) -> list[tuple[str, float, float]]:
    """(name, start, stop) of each run of an op, in microseconds.

    XLA's CPU runtime marks an op's start ("NAME") and its completion ("end: NAME"). Ops that run
    asynchronously (convolutions, dots) return long before they complete, so an op runs from
    its start to its next end mark; without end marks, for the length of its start event.
    """
    timed = sorted(
        (e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e),
        key=lambda e: float(e["ts"]),
    )
    open_runs: dict[str, collections.deque] = collections.defaultdict(collections.deque)
    runs: list[list] = []
    for e in timed:
        name, ts, dur = e["name"], float(e["ts"]), float(e["dur"])
        if name.startswith("end: ") and open_runs.get(name[5:]):
            run = open_runs[name[5:]].popleft()
            run[2] = max(run[2], ts + dur)
            continue
        op = ops.get(name)
        if op is not None and op.kind != CONTROL:
            run = [name, ts, ts + dur]
            runs.append(run)
            open_runs[name].append(run)
    return [(name, start, stop) for name, start, stop in runs]


def summarize(
    events: Sequence[Mapping[str, Any]],
    ops: Mapping[str, Op],
    *,
    steps: int,
    wall_s: float,
    layer_names: Mapping[int, str] | None = None,
    top: int = 10,
) -> StepProfile:
    """A `StepProfile` from trace events ({"ph": "X", "name", "ts", "dur"} in microseconds).

    A RuntimeError if no event is a run of one of `ops`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    kind_us: dict[str, float] = {k: 0.0 for k in KINDS}
    layer_us: dict[str, float] = collections.defaultdict(float)
    name_us: dict[str, float] = collections.defaultdict(float)
    intervals = _op_intervals(events, ops)
    if not intervals:
        raise RuntimeError(
            f"the profiler recorded no op of the compiled module on {jax.default_backend()}:"
            " its events do not carry HLO instruction names there (step_profile reads XLA's"
            " CPU runtime)"
        )
    for (name, _, _), dur in zip(intervals, _shared_us(intervals), strict=True):
        op = ops[name]
        kind_us[op.kind] += dur
        name_us[name] += dur
        if op.layer is None:
            layer = OUTSIDE_LAYERS
        else:
            label = (layer_names or {}).get(op.layer, f"layers_{op.layer}")
            layer = f"{label} {'bwd' if op.backward else 'fwd'}"
        layer_us[layer] += dur
    per_step = 1e-3 / steps
    ranked = sorted(name_us.items(), key=lambda kv: -kv[1])[:top]
    return StepProfile(
        steps=steps,
        wall_ms=wall_s * 1e3 / steps,
        busy_ms=_union_us((start, stop) for _, start, stop in intervals) * per_step,
        kind_ms={k: v * per_step for k, v in kind_us.items()},
        kind_busy_ms={
            k: _union_us((a, b) for name, a, b in intervals if ops[name].kind == k) * per_step
            for k in KINDS
        },
        layer_ms={k: v * per_step for k, v in sorted(layer_us.items(), key=lambda kv: -kv[1])},
        top_ops=[(name, ops[name].kind, us * per_step) for name, us in ranked],
    )


def _trace_events(log_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The events of the trace `jax.profiler.stop_trace` wrote under log_dir (Chrome format)."""
    files = sorted(log_dir.glob("**/*.trace.json.gz"))
    if not files:
        raise RuntimeError(f"jax.profiler wrote no trace under {log_dir}")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def profile_compiled(
    compiled, args: Sequence[Any], *, steps: int, layer_names: Mapping[int, str] | None = None
) -> tuple[StepProfile, Any]:
    """Run `compiled(*args)` (which runs `steps` steps) once under the profiler.

    Returns the profile and what the call returned. Run it warm: compilation and first-call
    costs are not step time.
    """
    with tempfile.TemporaryDirectory() as log_dir:
        jax.profiler.start_trace(log_dir)
        try:
            t = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            wall_s = time.perf_counter() - t
        finally:
            jax.profiler.stop_trace()
        events = _trace_events(pathlib.Path(log_dir))
    ops = hlo_ops(compiled.as_text())
    profile = summarize(events, ops, steps=steps, wall_s=wall_s, layer_names=layer_names)
    return profile, out
