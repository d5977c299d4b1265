"""The linear map of a `Dense` or `EinsumDense` layer, and what PVeRA adapts.

PVeRA reads every layer it adapts as one linear map from `in` to `out`
values, with an `(in, out)` kernel: `LinearEquation` for a `Dense` or
single-kernel `EinsumDense` layer (`in` the product of its contracted input
dims, `out` the product of its kernel's output dims, in the kernel's own,
row-major, order), `ConvolutionMap` (`convolution_map.py`) for a
convolution and `EmbeddingMap` (`embedding_map.py`) for an embedding. Each
map takes an input to the latent space (`project`), back to the output
(`expand`), lays out per-output vectors over the output (`output_scale`,
`row_scale`) and an `(in, out)` delta as its kernel (`kernel`).

`ADAPTED_LAYERS` is the one table of the layers PVeRA adapts, each kind
with its map: layer selection reads it (`unsupported_reason`) and so do the
adapted layers (`linear_equation_of`).
"""

import math
import string

import keras
from keras import ops

from keras_pvera.src.layers.convolution_map import CONVOLUTIONS
from keras_pvera.src.layers.convolution_map import ConvolutionMap
from keras_pvera.src.layers.embedding_map import EmbeddingMap
from keras_pvera.src.utils import keras_internals

DENSE_EQUATION = "...a,ab->...b"

# The quantization modes (`layer.quantize(mode)`) of base layers PVeRA runs
# beside; `None` is a float layer. Keras 3.12 has no int4 sub-channel, GPTQ
# or AWQ layers to meet.
ADAPTABLE_QUANTIZATION_MODES = (None, "int8", "float8", "int4", "gptq", "awq")


class LinearEquation:
    """The linear map of a `Dense` or single-kernel `EinsumDense` layer.

    Describes where the `in` and `out` axes of the kernel are, and derives the
    einsum equations PVeRA needs to go from the layer's input to the latent
    space and from the latent space to the layer's output.

    Args:
        equation: The layer's einsum equation (`"...a,ab->...b"` for `Dense`).
        kernel_shape: The kernel's shape.
    """

    def __init__(self, equation, kernel_shape):
        try:
            lhs, output_spec = equation.replace(" ", "").split("->")
            input_spec, kernel_spec = lhs.split(",")
        except ValueError:
            raise ValueError(
                f"PVeRA needs a single-kernel einsum equation such as "
                f"'abc,cd->abd'. Received: equation={equation!r}"
            ) from None
        shared = [c for c in kernel_spec if c in input_spec and c in output_spec]
        if shared or len(kernel_spec) != len(kernel_shape):
            raise ValueError(
                f"PVeRA supports einsum equations whose kernel axes are either "
                f"contracted with the input or copied to the output, not "
                f"both. Received: equation={equation!r}"
            )
        self.equation = equation
        self.output_spec = output_spec
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        contracted = [c for c in kernel_spec if c in input_spec]
        produced = [c for c in kernel_spec if c not in input_spec]
        dims = dict(zip(kernel_spec, self.kernel_shape, strict=False))
        self.in_dims = [dims[c] for c in contracted]
        self.out_dims = [dims[c] for c in produced]
        self.in_dim = math.prod(self.in_dims)
        self.out_dim = math.prod(self.out_dims)
        latent = next(c for c in string.ascii_letters if c not in equation)
        kept = "".join(c for c in input_spec if c not in contracted)
        contracted = "".join(contracted)
        produced = "".join(produced)
        self.produced = produced
        # x (..., in dims) -> latent (..., k), and back to y (..., out dims).
        self.to_latent = f"{input_spec},{contracted}{latent}->{kept}{latent}"
        # Inputs with the same key share their product with `A` (see
        # `ProjectionRegistry.project`).
        self.projection_key = (self.to_latent, tuple(self.in_dims))
        self.from_latent = f"{kept}{latent},{latent}{produced}->{output_spec}"
        # When x ends with the contracted dims and y with the produced ones
        # (Dense, KerasHub's attention layers), plain matmuls do it faster.
        self.trailing = (
            input_spec == kept + contracted and output_spec == kept + produced
        )
        # (in dims..., out dims...) -> kernel order
        order = contracted + produced
        self.to_kernel_order = [order.index(c) for c in kernel_spec]
        # A per-output vector broadcasts over y when the output dims come
        # last in y (true of Dense and of KerasHub's EinsumDense layers).
        in_output = "".join(c for c in output_spec if c in produced)
        self.output_scale_order = (
            [produced.index(c) for c in in_output]
            if output_spec.endswith(in_output)
            else None
        )

    def project(self, inputs, matrix):
        """`inputs` (..., in dims) times an `(in, k)` matrix: (..., k)."""
        if not self.trailing:
            kernel = ops.reshape(matrix, (*self.in_dims, -1))
            return ops.einsum(self.to_latent, inputs, kernel)
        if len(self.in_dims) > 1:
            leading = ops.shape(inputs)[: -len(self.in_dims)]
            inputs = ops.reshape(inputs, (*leading, self.in_dim))
        return ops.matmul(inputs, matrix)

    def expand(self, latent, matrix):
        """`latent` (..., k) times a `(k, out)` matrix, laid out as `y`."""
        if not self.trailing:
            kernel = ops.reshape(matrix, (-1, *self.out_dims))
            return ops.einsum(self.from_latent, latent, kernel)
        y = ops.matmul(latent, matrix)
        if len(self.out_dims) > 1:
            y = ops.reshape(y, (*ops.shape(y)[:-1], *self.out_dims))
        return y

    def __call__(self, inputs, kernel):
        """Computes the map with a kernel of the layer's layout.

        `Dense`'s equation runs as `matmul`, as `Dense` itself does, so an
        adapter with `lambda_b = 0` reproduces the base layer bit for bit.
        """
        if self.equation == DENSE_EQUATION:
            return ops.matmul(inputs, kernel)
        return ops.einsum(self.equation, inputs, kernel)

    def add_bias(self, y, bias):
        """Adds the layer's bias to the map's output."""
        return ops.add(y, bias)

    def output_scale(self, vector):
        """Lays out an `(out,)` vector to broadcast over the output `y`.

        Returns `None` when the output dims do not come last in `y`.
        """
        if self.output_scale_order is None:
            return None
        vector = ops.reshape(vector, self.out_dims)
        if self.output_scale_order != sorted(self.output_scale_order):
            vector = ops.transpose(vector, self.output_scale_order)
        return vector

    def row_scale(self, rows, ndim):
        """Lays out `(batch, out)` vectors to scale `y` (of rank `ndim`) row
        by row: row `i` of `y` by vector `i` (`y`'s first axis is the batch).
        """
        spec = self.output_spec
        if "..." in spec:
            before, after = spec.split("...")
            axes = [*before, *[None] * (ndim - len(before) - len(after)), *after]
        else:
            axes = list(spec)
        in_y = [c for c in axes[1:] if c is not None and c in self.produced]
        rows = ops.reshape(rows, (-1, *self.out_dims))
        order = [0] + [1 + self.produced.index(c) for c in in_y]
        if order != sorted(order):
            rows = ops.transpose(rows, order)
        dims = dict(zip(self.produced, self.out_dims, strict=True))
        return ops.reshape(rows, (-1, *[dims.get(c, 1) for c in axes[1:]]))

    def kernel(self, matrix):
        """Turns an `(in, out)` matrix into the layer's kernel layout."""
        matrix = ops.reshape(matrix, (*self.in_dims, *self.out_dims))
        if self.to_kernel_order != sorted(self.to_kernel_order):
            matrix = ops.transpose(matrix, self.to_kernel_order)
        return matrix


# Dense-like layers: one kernel, read as a plain (einsum) linear map.
LINEAR_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense)


def _linear_map(layer):
    equation = (
        layer.equation
        if isinstance(layer, keras.layers.EinsumDense)
        else DENSE_EQUATION
    )
    return LinearEquation(equation, keras_internals.kernel_shape(layer))


# The one table of what PVeRA adapts: each kind of layer, and its map.
MAPS = (
    (LINEAR_LAYERS, _linear_map),
    (CONVOLUTIONS, ConvolutionMap),
    ((keras.layers.Embedding,), EmbeddingMap),
)

ADAPTED_LAYERS = tuple(kind for kinds, _ in MAPS for kind in kinds)

SUPPORTED = (
    "keras.layers.Dense, EinsumDense, Conv1D, Conv2D, Conv3D (groups=1) and "
    "Embedding layers (KerasHub's ReversibleEmbedding included)"
)


def unsupported_reason(layer):
    """Why PVeRA cannot adapt `layer`, or `None` when it can.

    Args:
        layer: A Keras layer.

    Returns:
        `None` for a layer of `ADAPTED_LAYERS` (a convolution with
        `groups=1`), else a sentence naming the layer and what PVeRA adapts.

    Example:

    >>> unsupported_reason(keras.layers.Dense(2)) is None
    True
    """
    kind = type(layer).__name__
    if not isinstance(layer, ADAPTED_LAYERS):
        return f"PVeRA adapts {SUPPORTED}; layer {layer.name!r} is a {kind}."
    if isinstance(layer, CONVOLUTIONS) and getattr(layer, "groups", 1) != 1:
        return (
            f"PVeRA adapts convolutions with groups=1; layer {layer.name!r} "
            f"({kind}) has groups={layer.groups}. It adapts {SUPPORTED}."
        )
    return None


def check_quantization_mode(layer):
    """Raises `ValueError` unless PVeRA runs beside `layer`'s quantization
    mode (`ADAPTABLE_QUANTIZATION_MODES`)."""
    if layer.quantization_mode not in ADAPTABLE_QUANTIZATION_MODES:
        raise ValueError(
            f"Layer {layer.name!r} is quantized with "
            f"mode={layer.quantization_mode!r}, which PVeRA does not "
            "adapt. It adapts float layers and layers quantized with "
            f"modes {list(ADAPTABLE_QUANTIZATION_MODES[1:])}."
        )


def linear_equation_of(layer):
    """The linear map of a built layer that PVeRA adapts.

    Args:
        layer: A built layer of `ADAPTED_LAYERS`.

    Returns:
        A `LinearEquation` (`Dense`, `EinsumDense`), `ConvolutionMap` or
        `EmbeddingMap`: the map `MAPS` gives its kind.
    """
    for kinds, make_map in MAPS:
        if isinstance(layer, kinds):
            return make_map(layer)
    raise TypeError(unsupported_reason(layer))
