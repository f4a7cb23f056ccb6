"""Thin Flax Linen modules over the pure layers in `cnn.layers`.

Each module holds its parameters and calls the pure function; `geometry()` says what it does to
space (read by `cnn.receptive_field`), `output_shape()` infers shapes analytically, and
`macs()` counts multiply-accumulates per example. Every `__call__` takes `train` so that a
`Sequential` can pass it to all layers alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn import activations, layers
from cnn.geometry import Geometry, PaddingLike, pair, resolve_padding

Array = jax.Array
Shape = tuple[int, ...]


class ConvCall(NamedTuple):
    """A Conv's input and parameters (batch norm folded in), for a later layer to run it: a
    BatchNorm with max_pool runs conv, relu, batch norm and pool as one
    (`layers.conv2d_batch_norm_max_pool`); a 1x1 Conv, conv, relu, 1x1 conv and relu
    (`layers.conv2d_relu_conv1x1`)."""

    x_BHWC: Array
    w_HWIO: Array
    b_O: Array | None
    padding: PaddingLike
    impl: str


class Conv(nn.Module):
    """2-D convolution, NHWC in and out, HWIO kernel."""

    features: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: PaddingLike = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    kernel_init: Any = "he_normal"
    bias_init: Any = "zeros"
    impl: str = "auto"

    @nn.compact
    def __call__(
        self,
        x_BHWC: Array | ConvCall,
        train: bool = False,
        activation: str | None = None,
        stats: bool = False,
        in_affine: tuple[Array, Array] | None = None,
        defer: bool = False,
    ):
        """activation and stats as in `layers.conv2d`; Sequential fuses a following relu, and
        the batch norm after it, this way. in_affine=(inv_C, shift_C): convolve x * inv + shift
        instead of x, folded into the kernel and bias (`layers.fold_affine`: no padding, groups
        1); Sequential folds a batch norm before the conv this way. defer=True: return the
        ConvCall, unrun (needs `runs_later()`). x a ConvCall (this conv `pointwise()`, with
        activation="relu"): relu(this conv of relu(that conv)), both run by
        `layers.conv2d_relu_conv1x1`; Sequential does this for conv, relu, 1x1 conv, relu."""
        del train
        kh, kw = pair(self.kernel_size, "kernel_size")
        first = x_BHWC if isinstance(x_BHWC, ConvCall) else None
        if first is not None:
            if (
                not self.pointwise()
                or first.impl != self.impl
                or activation != "relu"
                or stats
                or in_affine is not None
                or defer
            ):
                raise ValueError(
                    f"Conv {self.name}: a ConvCall input needs this conv pointwise() (1x1, stride"
                    f" 1, dilation 1, groups=1, no padding), the same impl as that conv's and"
                    f" activation='relu', without stats, in_affine or defer; got kernel"
                    f" {(kh, kw)}, stride {self.stride}, padding {self.padding!r}, impl"
                    f" {self.impl!r} (that conv's {first.impl!r}), activation={activation!r},"
                    f" stats={stats}, in_affine={in_affine is not None}, defer={defer}"
                )
            c_in = first.w_HWIO.shape[3]
        elif x_BHWC.ndim != 4:
            raise ValueError(f"Conv {self.name}: input must be NHWC (rank 4), got {x_BHWC.shape}")
        else:
            c_in = x_BHWC.shape[-1]
        if c_in % self.groups:
            raise ValueError(
                f"Conv {self.name}: groups={self.groups} must divide the input channels ({c_in})"
            )
        w = self.param(
            "kernel",
            layers.initializer(self.kernel_init),
            (kh, kw, c_in // self.groups, self.features),
            jnp.float32,
        )
        b = (
            self.param("bias", layers.initializer(self.bias_init), (self.features,), jnp.float32)
            if self.use_bias
            else None
        )
        if first is not None:
            return layers.conv2d_relu_conv1x1(
                first.x_BHWC, first.w_HWIO, first.b_O, w, b, padding=first.padding, impl=self.impl
            )
        if in_affine is not None:
            if not self.folds(x_BHWC.shape):
                raise ValueError(
                    f"Conv {self.name}: in_affine needs no padding and groups=1, got padding"
                    f" {self.padding!r}, groups={self.groups}"
                )
            w, b = layers.fold_affine(w, b, *in_affine)
        if defer:
            if not self.runs_later() or activation is not None or stats:
                raise ValueError(
                    f"Conv {self.name}: defer=True needs stride 1, dilation 1, groups=1 and no"
                    f" activation or stats (the layer that runs it applies them); got stride"
                    f" {self.stride}, dilation {self.dilation}, groups={self.groups},"
                    f" activation={activation!r}, stats={stats}"
                )
            return ConvCall(x_BHWC, w, b, self.padding, self.impl)
        return layers.conv2d(
            x_BHWC,
            w,
            b,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            impl=self.impl,
            activation=activation,
            stats=stats,
        )

    def runs_later(self) -> bool:
        """Whether defer=True can hand this conv to a later layer (stride 1, no dilation, groups
        1: what `layers.conv2d_batch_norm_max_pool` takes)."""
        return (
            pair(self.stride, "stride") == (1, 1)
            and pair(self.dilation, "dilation") == (1, 1)
            and self.groups == 1
        )

    def pointwise(self) -> bool:
        """Whether this is a 1x1 conv that takes a ConvCall (`runs_later()`, no padding)."""
        kernel = pair(self.kernel_size, "kernel_size")
        pads = resolve_padding(self.padding, kernel, kernel, (1, 1), (1, 1))
        return kernel == (1, 1) and self.runs_later() and pads == ((0, 0), (0, 0))

    def folds(self, in_shape: Shape) -> bool:
        """Whether an affine map of the input folds into this conv exactly (`in_affine`)."""
        if self.groups != 1 or len(in_shape) != 4:
            return False
        kernel = pair(self.kernel_size, "kernel_size")
        pads = resolve_padding(
            self.padding, tuple(in_shape[1:3]), kernel, pair(self.stride, "stride"),
            pair(self.dilation, "dilation"),
        )  # fmt: skip
        return pads == ((0, 0), (0, 0))

    def geometry(self) -> Geometry:
        return Geometry(
            "window",
            kernel=pair(self.kernel_size, "kernel_size"),
            stride=pair(self.stride, "stride"),
            padding=self.padding,
            dilation=pair(self.dilation, "dilation"),
        )

    def output_shape(self, in_shape: Shape) -> Shape:
        kh, kw = pair(self.kernel_size, "kernel_size")
        return layers.conv2d_shape(
            in_shape,
            (kh, kw, in_shape[-1] // self.groups, self.features),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )

    def macs(self, in_shape: Shape) -> int:
        kh, kw = pair(self.kernel_size, "kernel_size")
        _, ho, wo, o = self.output_shape(in_shape)
        return ho * wo * o * kh * kw * (in_shape[-1] // self.groups)

    def num_params(self, in_shape: Shape) -> int:
        kh, kw = pair(self.kernel_size, "kernel_size")
        return kh * kw * (in_shape[-1] // self.groups) * self.features + (
            self.features if self.use_bias else 0
        )


class _Pool(nn.Module):
    window: int | Sequence[int] = 2
    stride: int | Sequence[int] | None = None
    padding: PaddingLike = 0

    def _stride(self):
        return pair(self.window if self.stride is None else self.stride, "stride")

    def geometry(self) -> Geometry:
        window = pair(self.window, "window")
        return Geometry("window", kernel=window, stride=self._stride(), padding=self.padding)

    def output_shape(self, in_shape: Shape) -> Shape:
        return layers.pool_shape(in_shape, self.window, self._stride(), self.padding)


class MaxPool(_Pool):
    """Max pooling; stride defaults to the window."""

    def tiles(self) -> bool:
        """Non-overlapping windows, no padding: what a batch norm before it can fuse with."""
        return self._stride() == pair(self.window, "window") and self.padding in (0, "VALID")

    def __call__(self, x_BHWC: Array, train: bool = False) -> Array:
        del train
        return layers.max_pool(x_BHWC, self.window, self.stride, self.padding)


class AvgPool(_Pool):
    """Average pooling; stride defaults to the window; padding counts as zeros."""

    def __call__(self, x_BHWC: Array, train: bool = False) -> Array:
        del train
        return layers.avg_pool(x_BHWC, self.window, self.stride, self.padding)


class GlobalAvgPool(nn.Module):
    """Mean over all positions: (B, H, W, C) -> (B, C)."""

    def __call__(self, x_BHWC: Array, train: bool = False) -> Array:
        del train
        return layers.global_avg_pool(x_BHWC)

    def geometry(self) -> Geometry:
        return Geometry("global")

    def output_shape(self, in_shape: Shape) -> Shape:
        return (in_shape[0], in_shape[-1])


class _Pointwise(nn.Module):
    """A layer that keeps the spatial geometry."""

    def geometry(self) -> Geometry:
        return Geometry("identity")

    def output_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)


class BatchNorm(_Pointwise):
    """Batch normalization: batch statistics when training, running statistics otherwise."""

    momentum: float = 0.9
    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(
        self,
        x: Array | ConvCall,
        train: bool = False,
        mask_B: Array | None = None,
        sums_B2C: Array | None = None,
        max_pool: int | Sequence[int] | None = None,
        affine: bool = False,
    ):
        """sums_B2C: x's per-image sums, if the layer before took them (`layers.batch_norm`).
        max_pool: a window; then returns the max pool of the output, computed with it
        (`layers.batch_norm_max_pool`). Sequential fuses a following MaxPool this way.
        affine=True: returns (inv_C, shift_C), the map x * inv + shift it applies, for the next
        conv to fold (`layers.batch_norm_affine`); Sequential folds it into a following Conv.
        x a ConvCall (with max_pool): normalizes relu(that conv), run here with the batch norm
        and the pool (`layers.conv2d_batch_norm_max_pool`); Sequential does this for conv, relu,
        batch norm, max pool."""
        conv = x if isinstance(x, ConvCall) else None
        if conv is not None and (max_pool is None or affine or sums_B2C is not None):
            raise ValueError(
                f"BatchNorm {self.name}: a ConvCall input needs max_pool, and takes no sums or"
                " affine=True"
            )
        c = conv.w_HWIO.shape[-1] if conv is not None else x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        if not self.use_scale:
            scale = jax.lax.stop_gradient(jnp.ones_like(scale))
        if not self.use_bias:
            bias = jax.lax.stop_gradient(jnp.zeros_like(bias))
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        kw = dict(train=train, momentum=self.momentum, eps=self.eps, mask_B=mask_B)
        if conv is not None:
            y, new_mean, new_var = layers.conv2d_batch_norm_max_pool(
                conv.x_BHWC, conv.w_HWIO, conv.b_O, scale, bias, mean.value, var.value, max_pool,
                padding=conv.padding, impl=conv.impl, **kw,
            )  # fmt: skip
        elif affine:
            inv, shift, new_mean, new_var = layers.batch_norm_affine(
                x, scale, bias, mean.value, var.value, sums_B2C=sums_B2C, **kw
            )
            y = (inv, shift)
        elif max_pool is None:
            y, new_mean, new_var = layers.batch_norm(
                x, scale, bias, mean.value, var.value, sums_B2C=sums_B2C, **kw
            )
        else:
            y, new_mean, new_var = layers.batch_norm_max_pool(
                x, scale, bias, mean.value, var.value, max_pool, sums_B2C=sums_B2C, **kw
            )
        if train and not self.is_initializing():
            mean.value, var.value = new_mean, new_var
        return y

    def num_params(self, in_shape: Shape) -> int:
        return 2 * in_shape[-1]


class Dropout(_Pointwise):
    """Drops each unit with probability `rate` when training (rng stream "dropout")."""

    rate: float

    def __call__(self, x: Array, train: bool = False) -> Array:
        if not train or self.rate == 0.0:
            return layers.dropout(jax.random.PRNGKey(0), x, self.rate, deterministic=True)
        return layers.dropout(self.make_rng("dropout"), x, self.rate)


class Activation(_Pointwise):
    """An activation from `cnn.activations`, by name."""

    fn: str = "relu"

    def __post_init__(self):
        activations.get(self.fn)  # fail at construction, with the list of valid names
        super().__post_init__()

    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        return activations.get(self.fn)(x)


class Flatten(_Pointwise):
    """(B, H, W, C) -> (B, H*W*C), row-major as Keras and PyTorch-on-NHWC."""

    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        return x.reshape(x.shape[0], -1)

    def output_shape(self, in_shape: Shape) -> Shape:
        return (in_shape[0], math.prod(in_shape[1:]))


def _layer_name(layer: nn.Module, index: int) -> str:
    """The user's name for the layer, else "<index>_<type>" (Flax renames list members layers_i)."""
    if layer.name and not layer.name.startswith("layers_"):
        return layer.name
    return f"{index}_{type(layer).__name__.lower()}"


class Sequential(nn.Module):
    """Layers applied in order. `return_features=True` also returns every layer's output by name."""

    layers: Sequence[nn.Module]
    fold_batch_norms: bool = True  # False: each batch norm writes its output (same function)

    def __post_init__(self):
        # Read the names before Flax adopts the layers (and renames them layers_<i>).
        names = tuple(_layer_name(layer, i) for i, layer in enumerate(self.layers))
        if len(set(names)) != len(names):
            raise ValueError(f"Sequential: layer names must be unique, got {names}")
        object.__setattr__(self, "_names", names)
        super().__post_init__()

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def __call__(
        self,
        x: Array,
        train: bool = False,
        return_features: bool = False,
        mask_B: Array | None = None,
    ):
        features: dict[str, Array] = {}
        skip, sums_B2C, affine = 0, None, None
        for i, (name, layer) in enumerate(zip(self.names, self.layers, strict=True)):
            if skip:  # this layer ran inside one before it
                skip -= 1
                continue
            if train and not return_features and self._conv_bn_pool(i):
                call = layer(x, train=train, in_affine=affine, defer=True)
                x = self.layers[i + 2](call, train, mask_B, max_pool=self.layers[i + 3].window)
                skip, affine = 3, None  # the relu, batch norm and pool ran here
            elif not return_features and self._conv_relu_conv1x1(i):
                call = layer(x, train=train, in_affine=affine, defer=True)
                x = self.layers[i + 2](call, train=train, activation="relu")
                skip, affine = 3, None  # the relu, 1x1 conv and relu ran here
            elif isinstance(layer, BatchNorm):
                nxt = self._layer(i + 1)
                if not return_features and self.fold_batch_norms and self._folds(i, x.shape):
                    affine = layer(x, train, mask_B, sums_B2C, affine=True)
                    sums_B2C = None
                    continue  # x stays as it is: the next conv applies the batch norm
                if train and not return_features and isinstance(nxt, MaxPool) and nxt.tiles():
                    x = layer(x, train, mask_B, sums_B2C, max_pool=nxt.window)
                    skip = 1  # the pool ran with the batch norm
                else:
                    x = layer(x, train=train, mask_B=mask_B, sums_B2C=sums_B2C)
                sums_B2C = None
            elif not return_features and self._relu_follows_conv(i):
                if train and isinstance(self._layer(i + 2), BatchNorm):
                    x, sums_B2C = layer(
                        x, train=train, activation="relu", stats=True, in_affine=affine
                    )
                else:
                    x = layer(x, train=train, activation="relu", in_affine=affine)
                skip, affine = 1, None
            elif affine is not None:
                x, affine = layer(x, train=train, in_affine=affine), None
            else:
                x = layer(x, train=train)
            if return_features:
                features[name] = x
        return (x, features) if return_features else x

    def _layer(self, i: int) -> nn.Module | None:
        return self.layers[i] if i < len(self.layers) else None

    def _folds(self, i: int, in_shape: Shape) -> bool:
        """A batch norm whose map folds into the Conv right after it (no padding, groups 1):
        the normalized tensor is never written, and its backward pass needs no reductions of
        its own (the conv's kernel gradient carries them)."""
        nxt = self._layer(i + 1)
        return isinstance(nxt, Conv) and nxt.folds(in_shape)

    def _conv_bn_pool(self, i: int) -> bool:
        """Conv, relu, batch norm, then a max pool of non-overlapping windows: one call (the
        batch norm's), so that the conv's gradients can be taken from the pooled gradient."""
        pool = self._layer(i + 3)
        return (
            self._relu_follows_conv(i)
            and self.layers[i].runs_later()
            and isinstance(self._layer(i + 2), BatchNorm)
            and isinstance(pool, MaxPool)
            and pool.tiles()
        )

    def _conv_relu_conv1x1(self, i: int) -> bool:
        """Conv, relu, a 1x1 Conv (the same impl), relu, and no BatchNorm next (it would take
        the statistics of the 1x1's output as it is written): one call, whose 1x1 reads the
        first conv's output in cache, and whose gradient there is never written."""
        second = self._layer(i + 2)
        return (
            self._relu_follows_conv(i)
            and self.layers[i].runs_later()
            and isinstance(second, Conv)
            and second.pointwise()
            and second.impl == self.layers[i].impl
            and self._relu_follows_conv(i + 2)
            and not isinstance(self._layer(i + 4), BatchNorm)
        )

    def _relu_follows_conv(self, i: int) -> bool:
        """Conv then relu: one call, so that a lowering can fuse them (the native one does, and
        takes the statistics of a batch norm after them as it writes its output)."""
        nxt = self._layer(i + 1)
        return isinstance(self.layers[i], Conv) and isinstance(nxt, Activation) and nxt.fn == "relu"

    def output_shapes(self, in_shape: Shape) -> list[Shape]:
        """Each layer's output shape, inferred without running anything."""
        shapes, shape = [], tuple(in_shape)
        for layer in self.layers:
            shape = tuple(layer.output_shape(shape))
            shapes.append(shape)
        return shapes
