"""The linear map of a convolution, as PVeRA reads it.

A `Conv1D`, `Conv2D` or `Conv3D` layer (`groups=1`) applies one linear map
to every patch of its input: the patch, flattened in the kernel's own order
`(*kernel_size, in_channels)`, has `in = prod(kernel_size) * in_channels`
values, and the map sends it to `out = filters` values. Its kernel
`(*kernel_size, in_channels, filters)` is that map's `(in, out)` matrix,
reshaped. So PVeRA adapts a convolution as it adapts a `Dense` layer over
the matrix of patches (im2col), without building that matrix:

    h = lambda_d * conv(dropout(x), reshape(A[:, :in].T,
                                             (*kernel_size, in_channels, 2r)))
    y = conv(x, W) + b + alpha * lambda_b * (z @ B[:filters, :].T)

The first convolution runs with the layer's own strides, padding, dilation
and data format, so `h` has one latent vector per output position; `z` (the
sampled or mean latent) goes to the output channels by a 1x1 map, a matmul
on the channel axis. The mean delta `(in, filters)` reshaped to the kernel's
shape is what merging adds to the kernel. Dropout drops input values (as
PEFT's LoRA on convolutions does), not entries of the patch matrix.
"""

import math

import keras
from keras import ops

from keras_pvera.src.utils import keras_internals

CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


class ConvolutionMap:
    """The linear map of a `Conv1D`/`Conv2D`/`Conv3D` layer with `groups=1`.

    The same interface as `LinearEquation` (`in_dim`, `out_dim`, `project`,
    `expand`, `output_scale`, `row_scale`, `kernel`, `add_bias`, calling it), with a
    patch of the input as the map's input.

    Args:
        layer: A built `Conv1D`, `Conv2D` or `Conv3D` layer with `groups=1`.

    Example:

    >>> layer = keras.layers.Conv2D(4, 3)
    >>> layer.build((None, 8, 8, 2))
    >>> conv = ConvolutionMap(layer)
    >>> conv.in_dim, conv.out_dim
    (18, 4)
    """

    def __init__(self, layer):
        kernel = keras_internals.kernel_variable(layer)
        kernel_shape = tuple(int(d) for d in kernel.shape)
        self.kernel_size = kernel_shape[:-2]
        self.in_channels = kernel_shape[-2]
        self.in_dim = math.prod(kernel_shape[:-1])
        self.out_dim = kernel_shape[-1]
        self.strides = list(layer.strides)
        self.dilation_rate = layer.dilation_rate
        self.padding = layer.padding
        self.data_format = layer.data_format
        self.channels_first = layer.data_format == "channels_first"
        # Inputs with the same key share their product with `A` (see
        # `ProjectionRegistry.project`).
        self.projection_key = (
            "conv",
            self.kernel_size,
            self.in_channels,
            tuple(self.strides),
            tuple(self.dilation_rate),
            self.padding,
            self.data_format,
        )

    def _convolve(self, inputs, kernel):
        padding = self.padding
        if padding == "causal":  # Conv1D only: pad the start, as it does.
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            pads = [[0, 0], [left, 0], [0, 0]]
            if self.channels_first:
                pads = [[0, 0], [0, 0], [left, 0]]
            inputs = ops.pad(inputs, pads)
            padding = "valid"
        return ops.conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    def project(self, inputs, matrix):
        """Each patch of `inputs` times an `(in, k)` matrix: `(N, *pos, k)`.

        The latent axis comes last whatever the data format.
        """
        kernel = ops.reshape(matrix, (*self.kernel_size, self.in_channels, -1))
        latent = self._convolve(inputs, kernel)
        if self.channels_first:
            latent = ops.moveaxis(latent, 1, -1)
        return latent

    def expand(self, latent, matrix):
        """`latent` `(N, *pos, k)` times a `(k, out)` matrix, laid out as `y`."""
        y = ops.matmul(latent, matrix)
        if self.channels_first:
            y = ops.moveaxis(y, -1, 1)
        return y

    def __call__(self, inputs, kernel):
        """The convolution with a kernel of the layer's layout, no bias."""
        return self._convolve(inputs, kernel)

    def add_bias(self, y, bias):
        """Adds a `(filters,)` bias on the channel axis."""
        if self.channels_first:
            bias = ops.reshape(bias, (self.out_dim,) + (1,) * len(self.kernel_size))
        return ops.add(y, bias)

    def output_scale(self, vector):
        """An `(out,)` vector laid out to scale `y`; `None` if channels first."""
        return None if self.channels_first else vector

    def row_scale(self, rows, ndim):
        """`(batch, filters)` vectors laid out to scale `y` row by row."""
        ones = (1,) * (ndim - 2)
        if self.channels_first:
            return ops.reshape(rows, (-1, self.out_dim, *ones))
        return ops.reshape(rows, (-1, *ones, self.out_dim))

    def kernel(self, matrix):
        """Turns an `(in, out)` matrix into a `(*kernel_size, in_channels,
        filters)` kernel."""
        return ops.reshape(matrix, (*self.kernel_size, self.in_channels, -1))
