"""The networks the configs train, by name. Each is a plain `cnn.nn.Sequential`."""

from __future__ import annotations

from collections.abc import Callable

import jax

from cnn import native
from cnn.nn import Activation, BatchNorm, Conv, Dropout, Flatten, GlobalAvgPool, MaxPool, Sequential


def eip_session1_original() -> Sequential:
    """The course's first network: 68,260 parameters, final receptive field 28."""
    return Sequential(
        [
            Conv(32, 3),
            Activation("relu"),
            Conv(10, 1),
            Activation("relu"),
            Conv(10, 26),
            Flatten(),
            Activation("softmax"),
        ]
    )


def eip_session1() -> Sequential:
    """The improved first DNN: stacked 3x3s, a max-pool and 1x1 reductions, no dense layer."""
    return Sequential(
        [
            Conv(16, 3),  # 26x26, r 3
            Activation("relu"),
            Conv(32, 3),  # 24x24, r 5
            Activation("relu"),
            MaxPool(2),  # 12x12, r 6
            Conv(16, 1),  # channel reduction
            Activation("relu"),
            Conv(32, 3),  # 10x10, r 10
            Activation("relu"),
            Conv(64, 3),  # 8x8, r 14
            Activation("relu"),
            Conv(16, 1),  # channel reduction
            Activation("relu"),
            Conv(10, 8),  # 1x1, r 28
            Flatten(),
            Activation("softmax"),
        ]
    )


def _block(features: int, dropout: float, padding: int = 0, impl: str = "auto") -> list:
    conv = Conv(features, 3, padding=padding, use_bias=False, impl=impl)
    layers = [conv, Activation("relu"), BatchNorm()]
    return layers + ([Dropout(dropout)] if dropout else [])


def _cpu_direct() -> str:
    """On a CPU without the native kernel, impl="direct" (measured faster there); else "auto"."""
    return "direct" if jax.default_backend() == "cpu" and not native.available() else "auto"


def tiny(dropout: float = 0.0) -> Sequential:
    """Under 8k parameters (7,746): BN, a GAP head; field covers the 28x28 input.

    No dropout by default: measured on an earlier, narrower version, dropout 0.05 cost
    accuracy (BENCHMARKS.md). The 1x1 after the pool keeps 10 channels (8 made one seed of
    three miss 99.4%). Every layer runs "auto" (on CPU: the native kernel); on a CPU without
    it, the 24x24 layer, the costliest, uses conv2d(impl="direct"): measured faster there than
    im2col (whose patches are 21 MB per batch).
    """
    return Sequential(
        [
            *_block(8, dropout),  # 26x26, r 3
            *_block(16, dropout, impl=_cpu_direct()),  # 24x24, r 5
            MaxPool(2),  # 12x12, r 6
            Conv(10, 1, use_bias=False),
            *_block(16, dropout),  # 10x10, r 10
            *_block(16, dropout),  # 8x8, r 14
            *_block(16, dropout),  # 6x6, r 18
            Conv(10, 1),
            GlobalAvgPool(),
            Activation("softmax"),
        ]
    )


def fast99() -> Sequential:
    """Quick to train: pool early, BN after every 3x3, GAP head; 99% after one epoch.

    The 26x26 layer dominates the step, so it is narrow (8 channels) and its BN follows the
    pool (13x13: a quarter of the work).
    """
    return Sequential(
        [
            Conv(8, 3, use_bias=False),  # 26x26, r 3
            Activation("relu"),
            MaxPool(2),  # 13x13, r 4
            BatchNorm(),
            *_block(32, 0.0),  # 11x11, r 8
            *_block(32, 0.0),  # 9x9, r 12
            MaxPool(2),  # 4x4, r 14
            *_block(64, 0.0, padding=1),  # 4x4, r 22
            Conv(10, 1),
            GlobalAvgPool(),  # r 28 at the corners: the field covers the input
            Activation("softmax"),
        ]
    )


MODELS: dict[str, Callable[[], Sequential]] = {
    "eip_session1_original": eip_session1_original,
    "eip_session1": eip_session1,
    "tiny": tiny,
    "fast99": fast99,
}


def get(name: str) -> Sequential:
    """The network called `name`; a ValueError lists the valid names otherwise."""
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}") from None
