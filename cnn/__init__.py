"""cnn: convolutional networks from first principles in JAX/Flax."""

from cnn import activations, geometry, layers, nn
from cnn.geometry import Geometry
from cnn.layers import (
    avg_pool,
    batch_norm,
    conv2d,
    conv2d_shape,
    dropout,
    global_avg_pool,
    max_pool,
    pool_shape,
)
from cnn.nn import (
    Activation,
    AvgPool,
    BatchNorm,
    Conv,
    Dropout,
    Flatten,
    GlobalAvgPool,
    MaxPool,
    Sequential,
)

__all__ = [
    "Activation",
    "AvgPool",
    "BatchNorm",
    "Conv",
    "Dropout",
    "Flatten",
    "Geometry",
    "GlobalAvgPool",
    "MaxPool",
    "Sequential",
    "activations",
    "avg_pool",
    "batch_norm",
    "conv2d",
    "conv2d_shape",
    "dropout",
    "geometry",
    "global_avg_pool",
    "layers",
    "max_pool",
    "nn",
    "pool_shape",
]
