"""Benchmark training throughput: python scripts/bench.py --config configs/X.py [--peer torch]
[--json] [--profile] [--steps N] [--warmup N] [--config.k=v]."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo's configs/

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cnn import benchmark, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.", lock_config=True)
_PEER = flags.DEFINE_enum("peer", None, ["torch"], "Also time the same network in this framework.")
_JSON = flags.DEFINE_bool("json", False, "Print exactly one JSON object on stdout.")
_STEPS = flags.DEFINE_integer(
    "steps", 512, "Timed training steps (whole dispatch chunks; with a peer, in rounds)."
)
_WARMUP = flags.DEFINE_integer("warmup", 64, "Untimed training steps after compilation.")
_ROUNDS = flags.DEFINE_integer(
    "peer_rounds",
    benchmark.PEER_ROUNDS,
    "With --peer: rounds alternating our steps and the peer's (1: ours, then its).",
)
_PROFILE = flags.DEFINE_bool(
    "profile", False, "Also profile one chunk: step time by kind of op and by layer."
)
_PEAK = flags.DEFINE_float(
    "peak_gflops",
    None,
    "Machine peak fp32 GFLOP/s; default: the better of a large matmul's rate before and after"
    " the timed steps.",
)
flags.mark_flags_as_required(["config"])


def _config_name(argv: list[str]) -> str:
    """The config file as given, plus any --config.k=v overrides."""
    path = flags.FLAGS["config"].config_filename
    overrides = [a for a in argv if a.startswith("--config.")]
    return " ".join([path, *overrides])


def _format(r: dict) -> str:
    lines = [
        f"config       {r['config']}",
        f"device       {r['device']} ({r['platform']}; host CPU: {r['host_cpu'] or 'unknown'})",
        f"model        {r['model']}: {r['params']:,} params, {r['macs']:,} forward MACs/image",
        f"batch        {r['batch_size']}, {r['steps']} timed steps after {r['warmup_steps']}",
        f"compile      {r['compile_s']:.2f} s",
        f"throughput   {r['images_per_s']:,.0f} images/s",
        f"compute      {r['gflops']:.2f} GFLOP/s = {r['peak_fraction']:.1%} of "
        f"{r['peak_gflops']:.0f} peak ({r['peak_source']}), "
        f"{r['nominal_peak_fraction']:.1%} of the nominal {r['nominal_peak_gflops']:g}",
        f"peak RSS     {r['peak_rss_mb']:.0f} MB",
    ]
    if r["peer"]:
        lines += [
            f"{r['peer']:<12} {r['peer_images_per_s']:,.0f} images/s on {r['peer_device']}"
            f" ({r['peer_gflops']:.2f} GFLOP/s)",
            f"ratio        {r['ratio']:.2f}x (ours / {r['peer']}); by round"
            f" {', '.join(f'{x:.2f}' for x in r['round_ratios'])}: median {r['ratio_median']:.2f}x",
        ]
    if "profile" in r:
        lines += _format_profile(r["profile"])
    return "\n".join(lines)


def _format_profile(p: dict) -> list[str]:
    wall = p["wall_ms"]
    lines = [
        f"profile      per step, {p['steps']} steps under the profiler: wall {wall:.2f} ms;"
        f" some op running {p['busy_ms']:.2f} ms ({p['busy_ms'] / wall:.0%}),"
        f" the rest is runtime overhead",
        "  by kind    "
        + "; ".join(f"{k} {ms:.2f} ms ({ms / p['op_ms']:.0%})" for k, ms in p["kind_ms"].items()),
    ]
    if p["matmul_conv_gflops"]:
        lines.append(
            f"  matmul/conv  some running {p['kind_busy_ms']['matmul/conv']:.2f} ms per step:"
            f" the step's training FLOPs at {p['matmul_conv_gflops']:.1f} GFLOP/s over that time"
        )
    lines.append("  by layer   (ms per step, share of op time)")
    lines += [f"    {ms:7.2f}  {ms / p['op_ms']:4.0%}  {k}" for k, ms in p["layer_ms"].items()]
    lines.append("  top ops")
    lines += [f"    {ms:7.2f}  {kind:<18}  {name}" for name, kind, ms in p["top_ops"]]
    return lines


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        result = benchmark.benchmark(
            _CONFIG.value,
            steps=_STEPS.value,
            warmup=_WARMUP.value,
            peer=_PEER.value,
            peak_gflops=_PEAK.value,
            config_name=_config_name(sys.argv[1:]),
            profile=_PROFILE.value,
            peer_rounds=_ROUNDS.value,
        )
    except (*train.USER_ERRORS, benchmark.TranslationError, benchmark.ArgumentError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result) if _JSON.value else _format(result))


if __name__ == "__main__":
    app.run(main)
