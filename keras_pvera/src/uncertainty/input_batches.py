"""Reading prediction inputs batch by batch, as NumPy structures.

`predict_with_uncertainty` accepts what `model.predict` accepts: arrays (or
lists, tuples and dicts of arrays), a `tf.data.Dataset`, a
`keras.utils.PyDataset`, or any other iterable of batches (a generator, a
PyTorch `DataLoader`). `InputBatches` checks them, then reads them batch by
batch through Keras' own data adapters (as `model.predict` does), as
NumPy structures, and knows how many batches there are when Keras does.
"""

import keras
import numpy as np

from keras_pvera.src.utils import keras_internals


def _is_tf_dataset(x):
    # Duck-typed so that TensorFlow is imported only by those who use it.
    return hasattr(x, "as_numpy_iterator") and hasattr(x, "element_spec")


def _has_batch_axis(arrays):
    leaves = keras.tree.flatten(arrays)
    return bool(leaves) and all(leaf.ndim > 0 for leaf in leaves)


def _inputs_of(element):
    """The `x` of a dataset element `(x,)`, `(x, y)` or `(x, y, weights)`."""
    if not isinstance(element, tuple):
        return keras.tree.map_structure(np.asarray, element)
    x, _, _ = keras.utils.unpack_x_y_sample_weight(element)
    return keras.tree.map_structure(np.asarray, x)


def num_rows(batch):
    """The number of examples in a batch (the first axis of its leaves).

    Args:
        batch: An array or a structure of arrays.

    Returns:
        An integer.

    Raises:
        ValueError: If the leaves disagree on their first dimension.
    """
    sizes = {int(leaf.shape[0]) for leaf in keras.tree.flatten(batch)}
    if len(sizes) != 1:
        raise ValueError(
            "All inputs must have the same number of examples (first "
            f"dimension). Received sizes: {sorted(sizes)}"
        )
    return sizes.pop()


class InputBatches:
    """Iterates over prediction inputs as batches of NumPy arrays.

    Args:
        x: NumPy arrays or a structure of them (a list, tuple or dict), a
            `tf.data.Dataset`, a `keras.utils.PyDataset`, or another iterable
            of batches. Dataset elements may be `x`, `(x,)`, `(x, y)` or
            `(x, y, sample_weight)`; only `x` is kept.
        array_batch_size: How many examples of in-memory arrays go in one
            batch. Datasets keep their own batches.

    Raises:
        ValueError: If `x` is `None`, an infinite `PyDataset`, or arrays of
            unequal lengths.
        TypeError: If `x` is of an unsupported type.

    Example:

    >>> batches = InputBatches(np.zeros((5, 2)), array_batch_size=2)
    >>> len(batches), [b.shape for b in batches]
    (3, [(2, 2), (2, 2), (1, 2)])
    """

    def __init__(self, x, array_batch_size):
        if x is None:
            raise ValueError("`x` is required. Received: x=None")
        if isinstance(x, keras.utils.PyDataset):
            if x.num_batches is None:
                raise ValueError(
                    "The PyDataset is infinite (`num_batches` is None); "
                    "predict_with_uncertainty needs a finite one."
                )
        elif _is_tf_dataset(x):
            pass
        elif isinstance(x, (np.ndarray, list, tuple, dict)) or (
            hasattr(x, "shape") and hasattr(x, "__getitem__")
        ):
            arrays = keras.tree.map_structure(np.asarray, x)
            if not _has_batch_axis(arrays):
                raise ValueError(
                    "Expected arrays, or a list, tuple or dict of arrays, "
                    "each with a batch dimension. Received: x of type "
                    f"{type(x).__name__}"
                )
            num_rows(arrays)  # Raises for unequal lengths.
            x = arrays
        elif hasattr(x, "__iter__"):
            if not keras_internals.is_torch_data_loader(x):
                # Keras reads generators of tuples; batches of `x` alone,
                # which predict_with_uncertainty has always read, become `(x,)`.
                x = (e if isinstance(e, tuple) else (e,) for e in x)
        else:
            raise TypeError(
                "`x` must be arrays (or a list, tuple or dict of them), a "
                "tf.data.Dataset, a keras.utils.PyDataset or an iterable of "
                f"batches. Received: x of type {type(x).__name__}"
            )
        # Keras' own dispatch, as `model.predict` reads these inputs.
        self.adapter = keras_internals.data_adapter(x, int(array_batch_size))

    def __len__(self):
        count = self.num_batches
        if count is None:
            raise TypeError("The number of batches of this input is unknown.")
        return count

    @property
    def num_batches(self):
        """The number of batches, or `None` when it is unknown."""
        return self.adapter.num_batches

    def __iter__(self):
        for element in self.adapter.get_numpy_iterator():
            yield _inputs_of(element)
