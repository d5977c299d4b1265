"""Several adapters in one batch: which adapter each example (row) uses.

A service hosting many fine-tunes of one base model batches requests for
different adapters together. `PVeRAModel.predict(x, adapter_names=[...])`
(and `generate`, `predict_with_uncertainty`) takes one adapter name per
example, `BASE_MODEL` (`"__base__"`) for the base model's output.

Inside such a call every `PVeRADense` layer computes the base output,
`x @ A.T` and the latent-to-output product once for the whole batch (all
adapters of a model share `A`, `B` and the rank), each row scaled by its
own adapter's `lambda_d` and `alpha * lambda_b`, gathered from a table
(zeros for the base model): no per-row kernel is made, and the cost of a
batch does not grow with the number of adapters it names. A model that
runs eagerly (torch) stacks the tables of the call's adapters once per
call; a compiled one (JAX, TensorFlow) indexes the rows into every loaded
adapter and stacks the tables inside its trace, so that one compiled
predict function serves every call, whichever adapters it names
(`PVeRAModel.adapters_by_row`). One noise draw per layer serves every
row, so each row is what running its adapter alone on the whole batch
would give it, Monte Carlo noise included. Each map lays out the rows'
output scales (`row_scale`), whatever the order of the output's dims; a
layer whose adapters read different rows of `B` (one of them fused into a
larger map) runs the latent-to-output product once per distinct offset.
`RowPath`, mixed into `PVeRADense`, is that computation.

The selection reaches the layers in two ways:
- through the model's inputs: `pack` puts the per-row adapter indices
  beside `x`, so Keras batches them (and `predict_with_uncertainty` tiles
  them) with the examples; `PVeRAModel.call` unpacks them;
- `selecting(names, indices, tables)`, the context in which layers read
  the selection (`current()`), opened by `PVeRAModel.call` or around a
  KerasHub task's `generate`.
"""

import contextlib
import math
import threading

import numpy as np
from keras import ops

from keras_pvera.src.layers.divergence import bound_log_variance

BASE_MODEL = "__base__"

# The keys of packed inputs: the model's own inputs, and the row indices.
INPUTS_KEY = "pvera_inputs"
INDICES_KEY = "pvera_adapter_indices"


class RowAdapters:
    """The adapter of each row of a batch.

    Args:
        names: The adapter names the rows pick from (a tuple: the call's,
            or every loaded adapter's; it may include `BASE_MODEL`).
        indices: An integer tensor of shape `(batch,)`: row `i` uses
            `names[indices[i]]`.
        tables: `{id(layer): layer.row_tables(names)}`, the layers' vectors
            stacked once for a whole call; a layer not in it stacks its own
            (inside a compiled function: from its variables, at each batch).
    """

    def __init__(self, names, indices, tables=None):
        self.names = tuple(names)
        self.indices = indices
        self.tables = {} if tables is None else tables

    def picks(self, name, ndim):
        """A boolean `(batch, 1, ..., 1)` tensor of rank `ndim`: `name`'s rows."""
        rows = ops.equal(self.indices, self.names.index(name))
        return ops.reshape(rows, (-1,) + (1,) * (ndim - 1))


_state = threading.local()


def current():
    """The `RowAdapters` of the call being traced or run, or `None`."""
    return getattr(_state, "rows", None)


@contextlib.contextmanager
def selecting(names, indices, tables=None):
    """Within this context, `PVeRADense` layers pick each row's adapter.

    Args:
        names: The adapter names of the batch (see `RowAdapters`).
        indices: The `(batch,)` integer indices into `names`.
        tables: The layers' stacked vectors (see `RowAdapters`), or `None`.
    """
    outer = current()
    indices = ops.convert_to_tensor(indices, "int32")
    _state.rows = RowAdapters(names, indices, tables)
    try:
        yield
    finally:
        _state.rows = outer


def index_rows(adapter_names, loaded, num_examples=None, merged=(), order=None):
    """Checks per-example adapter names; returns the batch's names and indices.

    Args:
        adapter_names: One adapter name per example (a list or tuple of
            strings); `BASE_MODEL` for the base model.
        loaded: The adapter names the model holds.
        num_examples: The number of examples, when known.
        merged: Names of adapters merged into the kernels.
        order: The names the indices point into (`BASE_MODEL` and every
            loaded adapter, say: the same for every call); `None` for the
            batch's own names.

    Returns:
        A tuple `(names, indices)`: the distinct names in order of first
        appearance, and an int32 NumPy array, one index per example into
        `order` (or, without it, into `names`).

    Raises:
        ValueError: For names that are not strings, not loaded, or fewer or
            more than the examples, or while adapters are merged.

    Example:

    >>> index_rows(["a", "__base__", "a"], loaded=["a", "b"])
    (('a', '__base__'), array([0, 1, 0], dtype=int32))
    >>> index_rows(["a", "__base__"], ["a", "b"], order=("__base__", "a", "b"))
    (('a', '__base__'), array([1, 0], dtype=int32))
    """
    if isinstance(adapter_names, str) or not isinstance(
        adapter_names, (list, tuple, np.ndarray)
    ):
        raise ValueError(
            "`adapter_names` must be a list with one adapter name per example "
            f"(or {BASE_MODEL!r} for the base model). Received: "
            f"adapter_names={adapter_names!r}"
        )
    adapter_names = [str(n) if isinstance(n, np.str_) else n for n in adapter_names]
    unknown = sorted(
        {repr(n) for n in adapter_names if n != BASE_MODEL and n not in loaded}
    )
    if unknown:
        raise ValueError(
            f"`adapter_names` names adapters that are not loaded: "
            f"{', '.join(unknown)}. Loaded adapters: {list(loaded)}, or "
            f"{BASE_MODEL!r} for the base model."
        )
    if num_examples is not None and len(adapter_names) != num_examples:
        raise ValueError(
            f"`adapter_names` must give one name per example: {num_examples} "
            f"examples, {len(adapter_names)} names."
        )
    if merged:
        raise ValueError(
            "`adapter_names` cannot pick adapters per example while adapters "
            f"{list(merged)} are merged into the kernels. Call "
            "`model.unmerge_adapter()` first."
        )
    names = tuple(dict.fromkeys(adapter_names))
    position = {name: i for i, name in enumerate(names if order is None else order)}
    indices = np.array([position[n] for n in adapter_names], dtype="int32")
    return names, indices


def pack(x, indices):
    """`x` with the per-example adapter indices beside it, for Keras to batch."""
    return {INPUTS_KEY: x, INDICES_KEY: indices}


def unpack(inputs):
    """`(x, indices)` of packed inputs; `(inputs, None)` for plain ones."""
    if isinstance(inputs, dict) and set(inputs) == {INPUTS_KEY, INDICES_KEY}:
        return inputs[INPUTS_KEY], inputs[INDICES_KEY]
    return inputs, None


class RowPath:
    """Mixed into `PVeRADense`: each row of a batch through its own adapter.

    The layer provides `adapter_vectors`, `linear` (its map),
    `projection_registry`, `base_layer` and its latent steps
    (`_projected`, `_noise`, `_add`).
    """

    def _per_row_path(self, inputs, rows, training):
        """Each row's own adapter (`row_adapters`): the base output plus the
        adapter of each row, from its own vectors gathered row by row.

        Every adapter of a model shares `A`, `B` and the rank, so one
        `x @ A.T` and one latent-to-output product serve the whole batch;
        rows of `"__base__"` (or of an adapter this layer does not hold)
        get zero vectors. One noise draw serves every row, so a row gets
        what its adapter alone would give it.
        """
        if training:
            raise ValueError(
                "Adapters picked per example (`adapter_names`) are for "
                "inference; to train an adapter, make it active with "
                "`model.set_adapter(name)`."
            )
        self._check_not_merged("pick adapters per example")
        batch, expected = inputs.shape[0], rows.indices.shape[0]
        if None not in (batch, expected) and batch != expected:
            raise ValueError(
                f"Layer {self.name!r} received {batch} rows but `adapter_names` "
                f"gives {expected}: one name per example is needed (a beam "
                "search, which multiplies rows, cannot pick adapters per row)."
            )
        y = self.base_layer(inputs)
        held = [self.adapter_vectors.get(name) for name in rows.names]
        if all(v is None for v in held):
            return y
        h = self._projected(inputs, 0.0, False)
        lambda_d, scale = self._row_vectors(rows, h, len(y.shape))
        h = ops.cast(ops.multiply(h, lambda_d), "float32")
        z, logvar = ops.split(h, 2, axis=-1)
        logvar = self._bound_rows(held, rows, logvar)
        sampling = [v is not None and v.config.sample_at_inference for v in held]
        if any(sampling):
            switch = self._row_switch(sampling, rows, len(z.shape), "float32")
            z = ops.add(z, ops.multiply(self._noise(logvar), switch))
        z = ops.cast(z, self.adapter_dtype)
        # Every row reads `B` from its adapter's `out_offset` (one offset
        # unless an adapter fuses this layer into a larger map).
        offsets = sorted({v.out_offset for v in held if v is not None})
        for offset in offsets:
            _, b = self.projection_registry.projections(
                self.in_dim, self.out_dim, offset
            )
            adapter = ops.multiply(self.linear.expand(z, ops.transpose(b)), scale)
            if len(offsets) > 1:
                reads = [v is not None and v.out_offset == offset for v in held]
                switch = self._row_switch(reads, rows, len(y.shape), adapter.dtype)
                adapter = ops.multiply(adapter, switch)
            y = self._add(y, adapter)
        return y

    def row_tables(self, names):
        """The vectors of adapters `names`, stacked: one row per name.

        What `_per_row_path` gathers each row's vectors from; a model that
        runs eagerly stacks them once per call, a compiled one inside its
        trace (`PVeRAModel.adapters_by_row`).

        Args:
            names: Adapter names; those this layer does not hold
                (`"__base__"` among them) get zero vectors.

        Returns:
            `None` when the layer holds none of `names`; else a tuple
            `(lambda_d, scale)` in the adapter dtype: `(len(names), 2r)`
            and `(len(names), out)`, `scale` being `alpha * lambda_b`.
        """
        held = [self.adapter_vectors.get(name) for name in names]
        first = next((v for v in held if v is not None), None)
        if first is None:
            return None
        zeros_d = ops.zeros(first.lambda_d.shape, first.lambda_d.dtype)
        zeros_b = ops.zeros((self.out_dim,), first.lambda_b.dtype)
        alphas = [[0.0 if v is None else v.config.alpha] for v in held]
        dtype = self.adapter_dtype
        lambda_d = ops.stack([zeros_d if v is None else v.lambda_d.value for v in held])
        lambda_b = ops.stack([zeros_b if v is None else v.lambda_b.value for v in held])
        scale = ops.multiply(ops.convert_to_tensor(alphas, dtype), lambda_b)
        return ops.cast(lambda_d, dtype), ops.cast(scale, dtype)

    def _row_vectors(self, rows, h, ndim):
        """Row by row: `lambda_d` laid out to scale `h`, and `alpha *
        lambda_b` laid out (by the map) to scale an output of rank `ndim`."""
        table_d, table_b = rows.tables.get(id(self)) or self.row_tables(rows.names)
        leading = (-1,) + (1,) * (len(h.shape) - 2)
        lambda_d = ops.reshape(
            ops.take(table_d, rows.indices, axis=0), leading + (h.shape[-1],)
        )
        scale = self.linear.row_scale(ops.take(table_b, rows.indices, axis=0), ndim)
        return lambda_d, scale

    def _bound_rows(self, held, rows, logvar):
        """`logvar` clipped row by row at each row's adapter's
        `max_log_variance` (an adapter without one: unchanged)."""
        bounds = [None if v is None else v.config.max_log_variance for v in held]
        if all(bound is None for bound in bounds):
            return logvar
        table = [math.inf if bound is None else bound for bound in bounds]
        bound = ops.take(ops.convert_to_tensor(table, "float32"), rows.indices)
        leading = (-1,) + (1,) * (len(logvar.shape) - 2)
        return bound_log_variance(logvar, ops.reshape(bound, leading + (1,)))

    def _row_switch(self, flags, rows, ndim, dtype):
        """1 on the rows whose name has a true flag (one per `rows.names`),
        else 0: a `(batch, 1, ..., 1)` tensor of rank `ndim`."""
        table = ops.convert_to_tensor([float(f) for f in flags], dtype)
        switch = ops.take(table, rows.indices, axis=0)
        return ops.reshape(switch, (-1,) + (1,) * (ndim - 1))
