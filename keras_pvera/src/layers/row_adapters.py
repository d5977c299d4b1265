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
would give it, Monte Carlo noise included.

The selection reaches the layers in two ways:
- through the model's inputs: `pack` puts the per-row adapter indices
  beside `x`, so Keras batches them (and `predict_with_uncertainty` tiles
  them) with the examples; `PVeRAModel.call` unpacks them;
- `selecting(names, indices, tables)`, the context in which layers read
  the selection (`current()`), opened by `PVeRAModel.call` or around a
  KerasHub task's `generate`.
"""

import contextlib
import threading

import keras
import numpy as np
from keras import ops

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


def num_examples(x):
    """The number of examples in array inputs (the first axis of each leaf).

    Raises:
        ValueError: For inputs that are not arrays (a dataset or generator:
            their batches cannot carry one adapter name per example), or
            leaves that disagree on the number of examples.
    """
    leaves = keras.tree.flatten(x)
    if not leaves or not all(len(getattr(leaf, "shape", ())) > 0 for leaf in leaves):
        raise ValueError(
            "`adapter_names` needs inputs as arrays (or a list, tuple or dict "
            "of arrays; raw strings or images for a KerasHub task), with one "
            f"name per example. Received: x of type {type(x).__name__}"
        )
    sizes = {int(leaf.shape[0]) for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(
            "All inputs must have the same number of examples (first "
            f"dimension). Received sizes: {sorted(sizes)}"
        )
    return sizes.pop()
