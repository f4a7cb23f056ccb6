"""Native convolutions: a C++ kernel for few channels, run by XLA as an FFI call on the CPU.

`conv(x_BHWC, w_HWIO, pads)` is a stride-1, undilated, ungrouped float32 convolution with a
custom VJP whose two gradients are native too: the input gradient is the same kernel run on
the output gradient with the flipped kernel, the kernel gradient its own loop. The library is
compiled from `native/conv.cc` by the machine's C++ compiler on first use (`-O3
-march=native`, a few seconds) and cached in `$CNN_CACHE_DIR/native`, keyed by the source, the
compiler, the flags and the CPU. `unavailable_reason()` says why it cannot be used, if so
(no compiler, a failed build, another backend, or `CNN_NATIVE=0` in the environment).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from cnn.files import cache_dir

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

MAX_CHANNELS = 32  # input and output channels; 4 vectors of 8 lanes
SOURCE = pathlib.Path(__file__).with_name("native") / "conv.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {"cnn_conv": "CnnConv", "cnn_conv_dw": "CnnConvDw"}
_BUILD_TIMEOUT_S = 300


class NativeError(RuntimeError):
    """The native kernel cannot run here; the message says why and what to do."""


def compiler() -> str | None:
    """The C++ compiler: env CXX, else g++, c++ or clang++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    return next((p for p in map(shutil.which, ("g++", "c++", "clang++")) if p), None)


def _cpu_identity() -> str:
    """What -march=native depends on: the first CPU's vendor, family, model and flags."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = ("vendor_id", "cpu family", "model", "flags", "Features", "CPU part")
    first = text.split("\n\n", 1)[0]
    return "\n".join(ln for ln in first.splitlines() if ln.split(":")[0].strip() in keep)


def library_path(cxx: str) -> pathlib.Path:
    """Where the library built by `cxx` for this CPU lives."""
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        version.encode(),
        " ".join(FLAGS).encode(),
        _cpu_identity().encode(),
        jax.ffi.include_dir().encode(),
    ):
        h.update(hashlib.sha256(part).digest())
    return cache_dir() / "native" / f"libcnn_conv-{h.hexdigest()[:16]}.so"


def build(cxx: str, path: pathlib.Path) -> None:
    """Compiles SOURCE into path (a temp file, then a rename); NativeError on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise NativeError(
                f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@functools.cache
def _load() -> str | None:
    """Builds (once per cache), loads and registers the library; the reason if it cannot."""
    if os.environ.get("CNN_NATIVE", "1") == "0":
        return "disabled by CNN_NATIVE=0 in the environment"
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler found (install g++, or set CXX to one)"
    try:
        path = library_path(cxx)
        if not path.exists():
            build(cxx, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in _TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (OSError, subprocess.SubprocessError, NativeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason() -> str | None:
    """None when the native kernel can run on the default backend, else why not."""
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU only, and the default backend is {jax.default_backend()}"
    return _load()


def available() -> bool:
    return unavailable_reason() is None


def require() -> None:
    """Raises NativeError naming the cause when the native kernel cannot run."""
    reason = unavailable_reason()
    if reason is not None:
        raise NativeError(f"the native convolution is unavailable: {reason}. Use impl='auto'.")


def supports(
    kernel, c_in: int, c_out: int, stride, dilation, groups: int, pads: Pads, dtype
) -> bool:
    """Whether `conv` computes this convolution (it says nothing of speed)."""
    return (
        tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and groups == 1
        and 1 <= c_in <= MAX_CHANNELS
        and 1 <= c_out <= MAX_CHANNELS
        and jnp.dtype(dtype) == jnp.float32
        and all(0 <= p <= k - 1 for k, side in zip(kernel, pads, strict=True) for p in side)
    )


def _call(target: str, out_shape, a: Array, b: Array, pads: Pads) -> Array:
    (pt, pb), (pl, pr) = pads
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential"
    )(
        a,
        b,
        pad_top=np.int64(pt),
        pad_bottom=np.int64(pb),
        pad_left=np.int64(pl),
        pad_right=np.int64(pr),
    )


def _forward(x_BHWC: Array, w_HWIO: Array, pads: Pads) -> Array:
    (pt, pb), (pl, pr) = pads
    b, h, w, _ = x_BHWC.shape
    kh, kw, _, o = w_HWIO.shape
    return _call(
        "cnn_conv", (b, h + pt + pb - kh + 1, w + pl + pr - kw + 1, o), x_BHWC, w_HWIO, pads
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x_BHWC: Array, w_HWIO: Array, pads: Pads) -> Array:
    """Stride-1 float32 convolution, pads ((top, bottom), (left, right)), each at most k - 1."""
    require()
    return _forward(x_BHWC, w_HWIO, pads)


def _conv_fwd(x_BHWC, w_HWIO, pads):
    require()
    return _forward(x_BHWC, w_HWIO, pads), (x_BHWC, w_HWIO)


def _conv_bwd(pads, res, g_BHWO):
    x_BHWC, w_HWIO = res
    kh, kw = w_HWIO.shape[:2]
    full = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]), (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
    w_flip_HWOI = jnp.flip(w_HWIO, (0, 1)).transpose(0, 1, 3, 2)
    dx_BHWC = _forward(g_BHWO, w_flip_HWOI, full)
    dw_HWIO = _call("cnn_conv_dw", w_HWIO.shape, x_BHWC, g_BHWO, pads)
    return dx_BHWC, dw_HWIO


conv.defvjp(_conv_fwd, _conv_bwd)
