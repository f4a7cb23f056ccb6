"""cnn.step_profile: HLO classification, op intervals and time shares, and a real profile."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cnn import benchmark, step_profile
from configs import tiny

_REPO = pathlib.Path(__file__).resolve().parents[1]

_BWD = 'op_name="jit(steps)/while/body/transpose(jvp(Sequential))/layers_3/conv_general_dilated"'
_RELU = 'op_name="jit(steps)/layers_12/jit(relu)/max"'
_HLO = f"""HloModule jit_steps

%fused_dot (p0: f32[8,4], p1: f32[4,2]) -> f32[8,2] {{
  %p0 = f32[8,4]{{1,0}} parameter(0)
  %p1 = f32[4,2]{{1,0}} parameter(1)
  ROOT %dot.9 = f32[8,2]{{1,0}} dot(%p0, %p1), lhs_contracting_dims={{1}}
}}

%fused_sum (p0: f32[8,4]) -> f32[4] {{
  %p0 = f32[8,4]{{1,0}} parameter(0)
  %c = f32[] constant(0)
  ROOT %reduce.1 = f32[4]{{0}} reduce(%p0, %c), dimensions={{0}}, to_apply=%add
}}

%fused_move (p0: f32[8,4]) -> f32[4,8] {{
  %p0 = f32[8,4]{{1,0}} parameter(0)
  ROOT %transpose.2 = f32[4,8]{{0,1}} transpose(%p0), dimensions={{1,0}}
}}

%fused_relu (p0: f32[8,4]) -> f32[8,4] {{
  %p0 = f32[8,4]{{1,0}} parameter(0)
  %zero = f32[8,4]{{1,0}} broadcast(f32[] constant(0)), dimensions={{}}
  ROOT %maximum.3 = f32[8,4]{{1,0}} maximum(%p0, %zero)
}}

ENTRY %main (a: f32[8,4], b: f32[4,2]) -> (f32[8,2], f32[4]) {{
  %a = f32[8,4]{{1,0}} parameter(0)
  %b = f32[4,2]{{1,0}} parameter(1)
  %ynn_fusion = f32[8,2]{{1,0}} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={{{_BWD}}}
  %ynn_fusion.1 = f32[4]{{0}} fusion(%a), kind=kCustom, calls=%fused_sum
  %transpose_fusion = f32[4,8]{{0,1}} fusion(%a), kind=kLoop, calls=%fused_move
  %max_fusion = f32[8,4]{{1,0}} fusion(%a), kind=kLoop, calls=%fused_relu, metadata={{{_RELU}}}
  %convolution.4 = f32[8,2]{{1,0}} convolution(%a, %b), window={{size=1}}
  %while.5 = (s32[], f32[8,4]{{1,0}}) while(%t), condition=%cond, body=%body
  %copy.6 = f32[8,4]{{1,0}} copy(%a)
  ROOT %tuple.7 = (f32[8,2]{{1,0}}, f32[4]{{0}}) tuple(%ynn_fusion, %ynn_fusion.1)
}}
"""


def test_hlo_ops_kinds_layers_and_passes():
    ops = step_profile.hlo_ops(_HLO)
    lib, fused, move = step_profile.LIBRARY, step_profile.FUSED, step_profile.MOVEMENT
    assert ops["ynn_fusion"] == step_profile.Op(lib, 3, True)  # a library fusion holding a dot
    assert ops["ynn_fusion.1"].kind == fused  # a library fusion of a reduction only
    assert ops["transpose_fusion"].kind == move
    assert ops["max_fusion"] == step_profile.Op(fused, 12, False)
    assert ops["convolution.4"] == step_profile.Op(lib, None, False)
    assert ops["while.5"].kind == step_profile.CONTROL  # tuple-shaped: opcode still found
    assert ops["copy.6"].kind == move


def _ops():
    lib, fused = step_profile.LIBRARY, step_profile.FUSED
    return {
        "conv": step_profile.Op(lib, 3, True),
        "relu": step_profile.Op(fused, 4, False),
        "adam": step_profile.Op(fused, None, False),
        "loop": step_profile.Op(step_profile.CONTROL, None, False),
    }


def _x(name, ts, dur):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur}


def test_async_ops_run_until_their_end_mark_and_overlaps_are_shared():
    events = [
        _x("loop", 0, 100),  # control flow: holds the others, not counted itself
        _x("conv", 0, 2),  # launched at 0; completes at 40 (its end mark)
        _x("relu", 10, 20),  # runs 10-30 beside the conv
        _x("end: relu", 30, 0),
        _x("end: conv", 39, 1),
        _x("adam", 50, 10),  # no end mark: its own event's length
        _x("unknown", 60, 30),  # not an op of this module: ignored
        {"ph": "i", "name": "conv", "ts": 70},  # not a complete event
    ]
    names = {3: "3_conv -> 24x24x16", 4: "4_activation -> 24x24x16"}
    p = step_profile.summarize(events, _ops(), steps=2, wall_s=100e-6, layer_names=names)
    assert p.wall_ms == pytest.approx(0.05)
    assert p.busy_ms == pytest.approx((40 + 10) / 2 / 1e3)  # 0-40 and 50-60, per step
    # 0-10 and 30-40 the conv alone, 10-30 shared by two: conv 30 us, relu 10 us, adam 10 us.
    assert p.layer_ms == pytest.approx(
        {
            "3_conv -> 24x24x16 bwd": 0.015,
            "4_activation -> 24x24x16 fwd": 0.005,
            step_profile.OUTSIDE_LAYERS: 0.005,
        }
    )
    assert p.kind_ms == pytest.approx(
        {step_profile.LIBRARY: 0.015, step_profile.FUSED: 0.01, step_profile.MOVEMENT: 0.0}
    )
    assert p.op_ms == pytest.approx(p.busy_ms)
    assert [name for name, _, _ in p.top_ops] == ["conv", "relu", "adam"]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        step_profile.summarize(events, _ops(), steps=0, wall_s=1.0)


def test_repeated_runs_of_one_op_pair_with_their_own_end_marks():
    events = [_x("conv", 0, 1), _x("end: conv", 9, 1), _x("conv", 20, 1), _x("end: conv", 24, 1)]
    p = step_profile.summarize(events, _ops(), steps=1, wall_s=1e-3)
    assert p.busy_ms == pytest.approx((10 + 5) / 1e3)
    assert p.kind_busy_ms[step_profile.LIBRARY] == pytest.approx(p.busy_ms)


def test_end_mark_inside_the_start_event_and_empty_runs():
    # A synchronous op's end mark can come before its own start event closes: the run keeps
    # its full length. A run of length zero takes no share of the time around it.
    events = [_x("relu", 0, 10), _x("end: relu", 9, 0.5), _x("adam", 20, 0), _x("conv", 30, 10)]
    p = step_profile.summarize(events, _ops(), steps=1, wall_s=1e-3)
    assert p.busy_ms == pytest.approx(20 / 1e3)
    assert p.op_ms == pytest.approx(p.busy_ms)
    assert p.layer_ms[step_profile.OUTSIDE_LAYERS] == 0


def _small_config():
    c = tiny.get_config()
    c.batch_size = 8
    c.steps_per_dispatch = 2
    return c


def test_benchmark_profiles_the_real_step(monkeypatch):
    monkeypatch.setattr(benchmark, "matmul_gflops", lambda: 100.0)
    result = benchmark.benchmark(_small_config(), steps=2, warmup=2, profile=True)
    p = result["profile"]
    assert p["steps"] == 2 and 0 < p["busy_ms"] <= p["wall_ms"]
    assert p["op_ms"] == pytest.approx(p["busy_ms"])
    assert sum(p["kind_ms"].values()) == pytest.approx(p["busy_ms"])
    conv_ms = p["kind_busy_ms"][step_profile.LIBRARY]
    assert p["kind_ms"][step_profile.LIBRARY] <= conv_ms <= p["busy_ms"]
    assert p["matmul_conv_gflops"] == pytest.approx(6 * result["macs"] * 8 / conv_ms / 1e6)
    layers = set(p["layer_ms"])
    # every conv of tiny has a forward and a backward pass in the profile, named by its layer
    convs = {"0_conv -> 26x26x8", "3_conv -> 24x24x16", "8_conv -> 10x10x16"}
    assert {f"{c} fwd" for c in convs} <= layers and {f"{c} bwd" for c in convs} <= layers
    assert "profile" not in benchmark.benchmark(_small_config(), steps=2, warmup=0)


def test_script_prints_the_profile():
    cmd = [sys.executable, str(_REPO / "scripts" / "bench.py"), "--config", "configs/tiny.py"]
    cmd += ["--steps=2", "--warmup=0", "--config.batch_size=8", "--config.steps_per_dispatch=2"]
    cmd += ["--peak_gflops=100", "--profile"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    assert "profile      per step, 2 steps under the profiler" in text
    assert "matmul/conv  some running" in text
    assert "3_conv -> 24x24x16 bwd" in text and "top ops" in text


def test_no_recorded_op_is_a_clear_error(monkeypatch):
    compiled = jax.jit(lambda x: x * 2).lower(jnp.ones(3)).compile()
    monkeypatch.setattr(step_profile, "_trace_events", lambda log_dir: [])
    with pytest.raises(RuntimeError, match="the profiler recorded no op of the compiled module"):
        step_profile.profile_compiled(compiled, (jnp.ones(3),), steps=1)
