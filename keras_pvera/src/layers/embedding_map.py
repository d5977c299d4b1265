"""The linear map of an embedding, as PVeRA reads it.

An `Embedding` layer's output for token `t` is row `t` of its matrix `E`
`(vocab, dim)`: the linear map `onehot(t) @ E`, with `in = vocab` and
`out = dim`. PVeRA adapts it as a `Dense` layer on one-hot inputs, where
`onehot(t) @ A[:, :vocab].T` is column `t` of `A`, a gather:

    h = lambda_d * A[:, t]                    # (..., 2r), no one-hot built
    y = E[t] + alpha * lambda_b * (z @ B[:dim, :].T)

and the mean delta `A[:r, :vocab].T @ diag(lambda_d[:r]) @ B[:dim, :].T @
diag(alpha * lambda_b)` `(vocab, dim)` is what merging adds to `E`.
Dropout on a one-hot input keeps or drops its one nonzero: the whole
latent vector of a token, scaled by `1 / (1 - rate)`.
"""

from keras import ops


class EmbeddingMap:
    """The linear map of an `Embedding` layer: token ids to their rows.

    The same interface as `LinearEquation` (`in_dim`, `out_dim`, `project`,
    `expand`, `output_scale`, `row_scale`, `kernel`, `add_bias`, calling it), with token
    ids as the input.

    Args:
        layer: A built `keras.layers.Embedding` (or a subclass, such as
            KerasHub's `ReversibleEmbedding`).

    Example:

    >>> import keras
    >>> layer = keras.layers.Embedding(100, 8)
    >>> layer.build((None, 5))
    >>> embedding = EmbeddingMap(layer)
    >>> embedding.in_dim, embedding.out_dim
    (100, 8)
    """

    reads_ids = True

    def __init__(self, layer):
        self.in_dim = int(layer.input_dim)
        self.out_dim = int(layer.output_dim)
        self.projection_key = ("embedding",)

    @staticmethod
    def token_ids(inputs):
        """The ids as integers, as `Embedding` casts them."""
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        return inputs

    def project(self, inputs, matrix):
        """Rows of a `(vocab, k)` matrix for each id of `inputs`: `(..., k)`."""
        return ops.take(matrix, self.token_ids(inputs), axis=0)

    def expand(self, latent, matrix):
        """`latent` `(..., k)` times a `(k, dim)` matrix."""
        return ops.matmul(latent, matrix)

    def __call__(self, inputs, kernel):
        """The lookup in a `(vocab, dim)` matrix."""
        return ops.take(kernel, self.token_ids(inputs), axis=0)

    def add_bias(self, y, bias):
        """Adds a bias (an `Embedding` has none: never called with one)."""
        return ops.add(y, bias)

    def output_scale(self, vector):
        """A `(dim,)` vector, which broadcasts over the output as it is."""
        return vector

    def row_scale(self, rows, ndim):
        """`(batch, dim)` vectors laid out to scale `y` row by row."""
        return ops.reshape(rows, (-1, *(1,) * (ndim - 2), self.out_dim))

    def kernel(self, matrix):
        """The `(vocab, dim)` delta is already the embedding's layout."""
        return matrix
