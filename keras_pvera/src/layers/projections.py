"""The frozen random projections `A` and `B` that PVeRA shares between layers.

Every adapted layer of a model reads the same two matrices: `A` of shape
`(2 * rank, in_max)` and `B` of shape `(out_max, rank)`, where `in_max` and
`out_max` are the largest input and output sizes among the adapted layers. A
layer of size `in -> out` uses the slices `A[:, :in]` and `B[:out, :]`.

The matrices are generated with NumPy's seeded PCG64 generator, in float64 and
then rounded to float32, so that one seed gives bit-identical matrices on
every backend, device and platform.
"""

import contextlib
import math
import threading

import keras
import numpy as np
from keras import ops


def generate_projections(seed, rank, in_max, out_max):
    """Generates PVeRA's shared projections from a seed, in NumPy.

    Both matrices are Kaiming-uniform: uniform in `[-bound, bound]` with
    `bound = sqrt(6 / fan_in)`, the second axis being the fan-in (`in_max` for
    `A`, `rank` for `B`). `A` is drawn first, then `B`, from one generator.

    Args:
        seed: Non-negative integer seed.
        rank: The latent size `r`.
        in_max: Largest input size among the adapted layers.
        out_max: Largest output size among the adapted layers.

    Returns:
        A tuple `(A, B)` of float32 NumPy arrays, shapes `(2 * rank, in_max)`
        and `(out_max, rank)`.

    Raises:
        ValueError: If `seed` or a size is negative (from NumPy's
            generator).

    Example:

    >>> a, b = generate_projections(seed=0, rank=4, in_max=8, out_max=3)
    >>> a.shape, b.shape
    ((8, 8), (3, 4))
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    bound_a = math.sqrt(6.0 / in_max)
    bound_b = math.sqrt(6.0 / rank)
    a = rng.uniform(-bound_a, bound_a, size=(2 * rank, in_max))
    b = rng.uniform(-bound_b, bound_b, size=(out_max, rank))
    return a.astype("float32"), b.astype("float32")


class _SharedProducts(threading.local):
    """Products `x @ A.T` of the current forward pass, per thread.

    `entries` maps `id(x)` to `(x, key, product)` records; `None` outside a
    `sharing_products` context (nothing is shared). Each thread has its own,
    so that two threads calling one model never see each other's tensors.
    """

    def __init__(self):
        self.entries = None

    def __reduce__(self):
        # A copy (deepcopy, pickle) starts with nothing shared.
        return (type(self), ())


@keras.saving.register_keras_serializable(package="keras_pvera")
class ProjectionRegistry(keras.layers.Layer):
    """Holds one copy of PVeRA's frozen projections for a whole model.

    All `PVeRADense` layers of an adapted model reference the same registry,
    so `A` and `B` exist once in memory and once in a saved file. With
    `save_projection=False` nothing is written when saving: the matrices are
    regenerated from `seed` when the model is loaded.

    Args:
        rank: The latent size `r` (positive integer).
        in_max: Largest input size among the adapted layers.
        out_max: Largest output size among the adapted layers.
        seed: Seed of the projections (non-negative integer).
        save_projection: Whether saving writes `A` and `B`.
        **kwargs: Base layer keyword arguments, such as `name`.

    Returns:
        A Keras layer holding `A` `(2 * rank, in_max)` and `B`
        `(out_max, rank)` as non-trainable weights; `projections(in_dim,
        out_dim)` returns the slices a layer uses.

    Raises:
        ValueError: From `projections`, for a layer larger than
            `in_max -> out_max`.

    Example:

    >>> registry = ProjectionRegistry(rank=4, in_max=16, out_max=8, seed=0)
    >>> a, b = registry.projections(in_dim=10, out_dim=8)
    >>> tuple(a.shape), tuple(b.shape)
    ((8, 10), (8, 4))
    """

    def __init__(self, rank, in_max, out_max, seed=0, save_projection=True, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.rank = int(rank)
        self.in_max = int(in_max)
        self.out_max = int(out_max)
        self.seed = int(seed)
        self.save_projection = bool(save_projection)
        a, b = generate_projections(self.seed, self.rank, self.in_max, self.out_max)
        self.projection_a = self.add_weight(
            name="pvera_A",
            shape=a.shape,
            initializer=lambda shape, dtype=None: a,
            dtype="float32",
            trainable=False,
        )
        self.projection_b = self.add_weight(
            name="pvera_B",
            shape=b.shape,
            initializer=lambda shape, dtype=None: b,
            dtype="float32",
            trainable=False,
        )
        self._shared = _SharedProducts()
        self.built = True

    @contextlib.contextmanager
    def sharing_products(self):
        """Within this context, layers that read the same input share `x @ A.T`.

        Attention's query, key and value layers read the same tensor and, by
        PVeRA's design, the same `A`: the product is computed once per
        forward pass (and its gradient once per backward pass). A product is
        found again by the identity of the input tensor (held while the
        context is open, so that its identity cannot be reused), which
        holds under JAX and TensorFlow tracing as in eager mode. Each
        context starts empty and its products are forgotten when it exits,
        so no pass ever reads another's. `PVeRAModel.call` and the task's
        `generate` open it.
        """
        outer = self._shared.entries
        self._shared.entries = {}
        try:
            yield
        finally:
            self._shared.entries = outer

    def project(self, x, linear):
        """Projects a layer's input onto `A`: `x @ A[:, :in].T` per token.

        Args:
            x: The adapted layer's input.
            linear: The layer's linear map (`LinearEquation`,
                `ConvolutionMap` or `EmbeddingMap`: how `x` meets `A`).

        Returns:
            A tensor of shape `(..., 2 * rank)`.
        """
        key = linear.projection_key
        entries = self._shared.entries
        records = [] if entries is None else entries.setdefault(id(x), [])
        for seen_x, seen_key, product in records:
            if seen_x is x and seen_key == key:
                return product
        a, _ = self.projections(linear.in_dim, 1)
        product = linear.project(x, ops.transpose(a))
        # Holding `x` keeps its identity from being reused while cached.
        records.append((x, key, product))
        return product

    def projections(self, in_dim, out_dim, out_offset=0):
        """Returns the slices `A[:, :in_dim]` and `B[out_offset:][:out_dim, :]`.

        Args:
            in_dim: Input size of the adapted layer (at most `in_max`).
            out_dim: Output size of the adapted layer.
            out_offset: First row of `B` the layer reads: 0, or the layer's
                row offset in a fused map (`PVeRAConfig.fused_groups`).
                `out_offset + out_dim` is at most `out_max`.

        Returns:
            A tuple of tensors of shapes `(2 * rank, in_dim)` and
            `(out_dim, rank)`.
        """
        end = out_offset + out_dim
        if in_dim > self.in_max or end > self.out_max:
            raise ValueError(
                f"A layer of size {in_dim} -> {out_dim} reading rows "
                f"[{out_offset}, {end}) of B does not fit this registry's "
                f"projections ({self.in_max} -> {self.out_max}); build the "
                "registry with in_max >= in_dim and out_max >= "
                "out_offset + out_dim."
            )
        a = self.projection_a
        b = self.projection_b
        if in_dim < self.in_max:
            a = a[:, :in_dim]
        if out_offset or end < self.out_max:
            b = b[out_offset:end, :]
        return a, b

    def save_own_variables(self, store):
        if self.save_projection:
            super().save_own_variables(store)

    def load_own_variables(self, store):
        # A file written with save_projection=False holds nothing here: the
        # projections regenerated from the seed in `__init__` are kept.
        if len(store.keys()) == 0:
            return
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "rank": self.rank,
                "in_max": self.in_max,
                "out_max": self.out_max,
                "seed": self.seed,
                "save_projection": self.save_projection,
            }
        )
        return config
