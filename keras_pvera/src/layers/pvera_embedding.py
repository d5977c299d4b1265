"""`PVeRAEmbedding`: the PVeRA adapter on a frozen `Embedding` layer.

The math is `PVeRADense`'s, with the token's one-hot vector as the input
(`EmbeddingMap`: `in` is the vocabulary size, and `x @ A[:, :in].T` is a
gather of `A`'s columns by token id). This class adds what an embedding's
call has that a `Dense` layer's has not: the reverse direction of KerasHub's
`ReversibleEmbedding`. (The padding mask of `mask_zero=True` is the base
layer's own `compute_mask`, as for every wrapped layer: `AsWrappedLayer`.)

A tied `ReversibleEmbedding` computes logits with its own matrix
(`reverse=True`: `logits = h @ E.T`). The adapter changes `E`, so the
reverse direction reads the adapted matrix too, with the mean delta:

    logits = h @ (E + dE).T
           = h @ E.T + ((h * alpha * lambda_b) @ B[:dim, :]
                        * lambda_d[:r]) @ A[:r, :vocab]

computed in that order, without making the `(vocab, dim)` delta. So merging
(`E + dE`) gives the same model in both directions. The reverse direction
has no latent code of its own (its input is not a token), so it never
samples: Monte Carlo noise enters through the forward lookup. An untied
`ReversibleEmbedding` keeps its separate reverse matrix, which is not
adapted.
"""

import keras
from keras import ops

from keras_pvera.src.layers import row_adapters
from keras_pvera.src.layers.pvera_dense import PVeRADense


@keras.saving.register_keras_serializable(package="keras_pvera")
class PVeRAEmbedding(PVeRADense):
    """PVeRA adapter around a frozen `Embedding` layer.

    Everything of `PVeRADense` (named adapters, sampling, KL term, merging,
    saving) holds; `lambda_b` has the embedding's `output_dim` values and the
    shared `A` at least `input_dim` (vocabulary size) columns. Calling it
    with `reverse=True` (KerasHub's `ReversibleEmbedding` with tied weights)
    returns logits from the adapted matrix, as the module docstring says.

    Args:
        base_layer: A `keras.layers.Embedding`, or a subclass such as
            KerasHub's `ReversibleEmbedding`.
        **kwargs: As for `PVeRADense`.

    Raises:
        TypeError: If `base_layer` is not an `Embedding`.

    Example:

    >>> import numpy as np
    >>> layer = PVeRAEmbedding(keras.layers.Embedding(100, 8), rank=4)
    >>> tuple(layer(np.array([[1, 2, 3]])).shape)
    (1, 3, 8)
    """

    def _check_base_layer(self, base_layer):
        if not isinstance(base_layer, keras.layers.Embedding):
            raise TypeError(
                "PVeRAEmbedding wraps a keras.layers.Embedding; use "
                "PVeRADense for Dense, EinsumDense and convolution layers. "
                f"Received: base_layer={base_layer!r} of type "
                f"{type(base_layer).__name__}"
            )

    @property
    def base_kernel(self):
        """The embedding matrix, as the base layer computes with it."""
        return self.base_layer.embeddings

    def _projected(self, inputs, dropout, training):
        """`A`'s columns for each token id (before `lambda_d`), dropped token
        by token as a dropped one-hot input would drop them."""
        h = self.projection_registry.project(inputs, self.linear)
        return self._dropout(h, dropout, training, per_position=True)

    def call(self, inputs, reverse=False, training=None):
        if reverse:
            return self._reverse(inputs)
        return super().call(inputs, training=training)

    def _reverse(self, inputs):
        """Logits from the adapted matrix (a tied `ReversibleEmbedding`)."""
        base = self.base_layer
        if not getattr(base, "tie_weights", False):
            return base(inputs, reverse=True)
        rows = row_adapters.current()
        names, sign = (self.active_names if self.enabled else ()), 1.0
        if rows is not None:  # Each row's own adapter (`row_adapters`).
            self._check_not_merged("pick adapters per example")
            names = tuple(n for n in rows.names if n in self.adapter_vectors)
        elif self.merged_names:
            # Merged adapters are in the matrix: none to add, or (adapters
            # disabled) the merged ones to take out.
            names, sign = ((), 1.0) if self.enabled else (self.merged_names, -1.0)
        if not names:
            return base(inputs, reverse=True)
        # The adapter adds to the logits before the base's soft cap.
        cap = base.logit_soft_cap
        base.logit_soft_cap = None
        try:
            logits = base(inputs, reverse=True)
        finally:
            base.logit_soft_cap = cap
        h = ops.cast(inputs, self.adapter_dtype)
        if rows is not None:
            delta = self._reverse_rows(h, rows)
        else:
            delta = sum(self._reverse_delta(h, name) for name in names)
        logits = ops.cast(
            ops.add(ops.cast(logits, self.adapter_dtype), ops.multiply(sign, delta)),
            logits.dtype,
        )
        if cap is not None:
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def _reverse_delta(self, h, name):
        """`h @ dE.T` for adapter `name`, through the rank-`r` factors."""
        vectors = self.adapter_vectors[name]
        a, b = self._projections(vectors)
        rank = vectors.config.rank
        scaled = ops.multiply(h, ops.multiply(vectors.config.alpha, vectors.lambda_b))
        latent = ops.multiply(ops.matmul(scaled, b), vectors.lambda_d[:rank])
        return ops.matmul(latent, a[:rank])

    def _reverse_rows(self, h, rows):
        """`h @ dE.T` row by row, each row with its adapter's vectors
        (`row_tables`; zeros for rows of no adapter of this layer)."""
        table_d, table_b = rows.tables.get(id(self)) or self.row_tables(rows.names)
        held = [self.adapter_vectors.get(name) for name in rows.names]
        first = next(v for v in held if v is not None)
        a, b = self._projections(first)
        rank = first.config.rank
        scale = self.linear.row_scale(
            ops.take(table_b, rows.indices, axis=0), len(h.shape)
        )
        lambda_d = ops.take(table_d, rows.indices, axis=0)[:, :rank]
        lambda_d = ops.reshape(lambda_d, (-1, *(1,) * (len(h.shape) - 2), rank))
        latent = ops.multiply(ops.matmul(ops.multiply(h, scale), b), lambda_d)
        return ops.matmul(latent, a[:rank])

    def compute_output_shape(self, input_shape, reverse=False):
        if reverse:
            return self.base_layer.compute_output_shape(input_shape, reverse=True)
        return self.base_layer.compute_output_shape(input_shape)
