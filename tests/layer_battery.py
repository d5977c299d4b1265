"""One battery of checks that every kind of adapted layer runs, as Keras'
`run_layer_test` and KerasHub's `run_backbone_test` run theirs.

Each kind (`KINDS`) is a Keras layer PVeRA adapts, with what it takes to
see it as the Dense map of the method (/work/shared/PVERA.md): its input
as rows `(..., in)`, its kernel as an `(in, out)` matrix, its bias, and the
layout of its output. A convolution's rows are its patches (im2col), an
embedding's the one-hot rows of its token ids. tests/layers/
test_adapted_layer_kinds.py runs the checks on each kind, in a tiny model:
the layer, then a Dense head.
"""

import dataclasses
import math
from collections.abc import Callable

import keras
import numpy as np
import pytest
from builders import to_numpy

VOCABULARY, DIM = 20, 6


def numpy_kl(mu, logvar):
    """The KL term of one layer: the mean over positions and latent units."""
    return np.mean(-0.5 * (1 + logvar - mu**2 - np.exp(logvar)))


def patches(x, kernel_size, strides, dilation, padding):
    """im2col: `(N, *out positions, prod(kernel_size) * C)` from a
    channels-last `x`, each patch flattened in the kernel's order."""
    spatial = x.shape[1:-1]
    pads = []
    for n, k, s, d in zip(spatial, kernel_size, strides, dilation, strict=True):
        reach = (k - 1) * d + 1
        if padding == "same":
            total = max((math.ceil(n / s) - 1) * s + reach - n, 0)
            pads.append((total // 2, total - total // 2))
        elif padding == "causal":
            pads.append((reach - 1, 0))
        else:
            pads.append((0, 0))
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out_shape = [
        (x.shape[1 + i] - (k - 1) * d - 1) // s + 1
        for i, (k, s, d) in enumerate(zip(kernel_size, strides, dilation, strict=True))
    ]
    rows = np.zeros((x.shape[0], *out_shape, math.prod(kernel_size) * x.shape[-1]))
    for position in np.ndindex(*out_shape):
        window = x
        for axis, (p, k, s, d) in enumerate(
            zip(position, kernel_size, strides, dilation, strict=True)
        ):
            index = p * s + d * np.arange(k)
            window = np.take(window, index, axis=axis + 1)
        rows[(slice(None), *position)] = window.reshape(x.shape[0], -1)
    return rows


# How each kind is a Dense map: (base layer, x) -> (rows, kernel, bias, layout),
# where `layout(y)` lays the Dense output `(..., out)` out as the layer does.


def dense_map(base, x):
    return x, to_numpy(base.kernel), to_numpy(base.bias), lambda y: y


def query_map(base, x):
    """`"abc,cde->abde"`, KerasHub's query: 6 -> 2 heads of 4."""
    kernel = to_numpy(base.kernel)
    bias = to_numpy(base.bias)
    return (
        x,
        kernel.reshape(kernel.shape[0], -1),
        None,
        lambda y: y.reshape(y.shape[:-1] + kernel.shape[1:]) + bias,
    )


def convolution_map(base, x):
    channels_first = base.data_format == "channels_first"
    if channels_first:
        x = np.moveaxis(x, 1, -1)
    rows = patches(x, base.kernel_size, base.strides, base.dilation_rate, base.padding)
    kernel = to_numpy(base.kernel).reshape(-1, base.filters)

    def layout(y):
        return np.moveaxis(y, -1, 1) if channels_first else y

    return rows, kernel, to_numpy(base.bias), layout


def embedding_map(base, ids):
    return np.eye(VOCABULARY)[ids], to_numpy(base.embeddings), None, lambda y: y


def reversible_embedding(**kwargs):
    keras_hub = pytest.importorskip("keras_hub")
    return keras_hub.layers.ReversibleEmbedding(VOCABULARY, DIM, **kwargs)


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of adapted layer: how to build it, its inputs, its Dense map."""

    name: str
    build: Callable  # () -> the base layer, unbuilt
    input_shape: tuple  # one row's
    as_dense: Callable  # (base layer, x) -> (rows, kernel, bias, layout)
    in_dim: int
    tokens: bool = False  # int token ids in [1, VOCABULARY) as inputs
    tied: bool = False  # also called with `reverse=True` (logits = h @ E.T)

    def __str__(self):
        return self.name

    def inputs(self, rows=2, seed=0):
        rng = np.random.default_rng(seed)
        if self.tokens:
            return rng.integers(1, VOCABULARY, size=(rows, *self.input_shape))
        return rng.normal(size=(rows, *self.input_shape)).astype("float32")

    def model(self):
        """The base layer, named "adapted", then a Dense head (and, for a
        tied embedding, its logits: the same layer called in reverse)."""
        keras.utils.set_random_seed(0)
        dtype = "int32" if self.tokens else "float32"
        inputs = keras.Input(self.input_shape, dtype=dtype)
        layer = self.build()
        x = layer(inputs)
        if self.tied:
            outputs = layer(keras.layers.Dense(DIM, name="head")(x), reverse=True)
        else:
            x = keras.layers.Flatten()(x)
            outputs = keras.layers.Dense(3, name="head")(x)
        return keras.Model(inputs, outputs)


KINDS = [
    Kind("dense", lambda: keras.layers.Dense(5, name="adapted"), (3, 4), dense_map, 4),
    Kind(
        "einsum_dense",
        lambda: keras.layers.EinsumDense(
            "abc,cde->abde", output_shape=(3, 2, 4), bias_axes="de", name="adapted"
        ),
        (3, 6),
        query_map,
        6,
    ),
    Kind(
        "conv1d",
        lambda: keras.layers.Conv1D(
            4, 3, padding="causal", dilation_rate=2, name="adapted"
        ),
        (9, 2),
        convolution_map,
        6,
    ),
    Kind(
        "conv2d",
        lambda: keras.layers.Conv2D(
            4, (3, 2), strides=(2, 1), padding="same", name="adapted"
        ),
        (7, 6, 3),
        convolution_map,
        18,
    ),
    Kind(
        "conv2d_channels_first",
        lambda: keras.layers.Conv2D(
            4, 3, dilation_rate=2, data_format="channels_first", name="adapted"
        ),
        (3, 8, 7),
        convolution_map,
        27,
    ),
    Kind(
        "conv3d",
        lambda: keras.layers.Conv3D(4, 2, strides=(1, 2, 1), name="adapted"),
        (4, 5, 3, 2),
        convolution_map,
        16,
    ),
    Kind(
        "embedding",
        lambda: keras.layers.Embedding(VOCABULARY, DIM, name="adapted"),
        (5,),
        embedding_map,
        VOCABULARY,
        tokens=True,
    ),
    Kind(
        "tied_embedding",
        lambda: reversible_embedding(logit_soft_cap=3.0, name="adapted"),
        (5,),
        embedding_map,
        VOCABULARY,
        tokens=True,
        tied=True,
    ),
]
