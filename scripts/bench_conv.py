"""Time each conv2d lowering on one layer: python scripts/bench_conv.py --x=B,H,W,C --w=KH,KW,C,O
[--padding=VALID|SAME|N] [--impls=im2col,direct] [--noinput_grad] [--json]."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from cnn import benchmark  # noqa: E402

_X = flags.DEFINE_list("x", None, "Input shape B,H,W,C (NHWC).")
_W = flags.DEFINE_list("w", None, "Kernel shape KH,KW,C,O (HWIO).")
_PADDING = flags.DEFINE_string("padding", "VALID", "VALID, SAME or a number of pixels.")
_IMPLS = flags.DEFINE_list("impls", [], "Lowerings to time; default every one that applies.")
_INPUT_GRAD = flags.DEFINE_bool("input_grad", True, "Include the input gradient.")
_STEPS = flags.DEFINE_integer("steps", 8, "Gradient steps per timed call (one lax.scan).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls; the best counts.")
_JSON = flags.DEFINE_bool("json", False, "Print exactly one JSON object on stdout.")
flags.mark_flags_as_required(["x", "w"])


def _shape(name: str, values: list[str]) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in values)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        sys.exit(f"error: --{name} needs four positive integers, got {','.join(values)}")
    return shape


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    x, w = _shape("x", _X.value), _shape("w", _W.value)
    padding = int(_PADDING.value) if _PADDING.value.isdigit() else _PADDING.value
    try:
        times = benchmark.time_conv_impls(
            x,
            w,
            padding=padding,
            impls=tuple(_IMPLS.value) or None,
            input_grad=_INPUT_GRAD.value,
            steps=_STEPS.value,
            repeats=_REPEATS.value,
        )
    except benchmark.ArgumentError as e:
        sys.exit(f"error: {e}")
    if _JSON.value:
        print(json.dumps({"x": x, "w": w, "padding": padding, "ms_per_step": times}))
        return
    print(f"x {x}  w {w}  padding {padding}: ms per forward + backward step")
    for impl, ms in sorted(times.items(), key=lambda kv: kv[1]):
        print(f"  {impl:10s} {ms:9.3f}")


if __name__ == "__main__":
    app.run(main)
