"""KerasHub tasks, recognised without importing keras-hub.

keras-hub imports TensorFlow, so it stays an optional dependency: a model
is a KerasHub task only if keras-hub was imported already (it made the
model). A task's raw inputs (strings, images) run through its
preprocessor with `tf.data`, as the task's own `fit` does.
"""

import reprlib
import sys

import keras
import numpy as np

from keras_pvera.src.utils import keras_internals


def keras_hub_model_class(name):
    """`keras_hub.models.<name>` if keras-hub is imported, else `None`.

    A model cannot be a KerasHub one unless keras-hub is imported already,
    so this never imports it (which would import TensorFlow).

    Args:
        name: A class name, such as `"Task"` or `"Backbone"`.
    """
    keras_hub = sys.modules.get("keras_hub")
    return getattr(getattr(keras_hub, "models", None), name, None)


def keras_hub_task(model):
    """Whether `model` is a KerasHub `Task` (keras-hub is not imported here).

    Args:
        model: A Keras model.

    Returns:
        True for a `keras_hub.models.Task` (a classifier, a causal LM...).
    """
    task_class = keras_hub_model_class("Task")
    return task_class is not None and isinstance(model, task_class)


def task_of(model):
    """The KerasHub task a `PVeRAModel` adapts, or `None`."""
    base = keras_internals.own_attribute(model, "base_model")
    return base if base is not None and keras_hub_task(base) else None


def task_with_preprocessor(model):
    """The adapted KerasHub task, if it has a preprocessor; else `None`."""
    task = task_of(model)
    if task is None or getattr(task, "preprocessor", None) is None:
        return None
    return task


def preprocessed(model, x, y=None, sample_weight=None, batch_size=None, shuffle=False):
    """`task_batches` of the KerasHub task a `PVeRAModel` adapts (`task_of`)."""
    return task_batches(task_of(model), x, y, sample_weight, batch_size, shuffle)


def task_batches(task, x, y=None, sample_weight=None, batch_size=None, shuffle=False):
    """`x` (with `y`, `sample_weight`) as batches of the task's inputs.

    Args:
        task: A KerasHub task, or `None`.
        x: Raw inputs, as for the task's `fit` (strings, images, a dict of
            them), or a `tf.data.Dataset` of raw batches.
        y, sample_weight: Labels and weights, if any.
        batch_size: Batch size for array inputs (default 32).
        shuffle: Whether to shuffle array inputs (each epoch).

    Returns:
        A `tf.data.Dataset` of preprocessed batches, or `None` when there is
        no task or it has no preprocessor (inputs are used as given).

    Raises:
        ValueError: For `y` or `sample_weight` given with a dataset, or an
            input that is not a batch (one string rather than a list).
    """
    if getattr(task, "preprocessor", None) is None or x is None:
        return None
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "When `x` is a tf.data.Dataset, `y` and `sample_weight` come "
                f"from it. Received: y={type(y).__name__}, "
                f"sample_weight={type(sample_weight).__name__}"
            )
        dataset = x
    else:
        check_batched(x)
        data = keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        dataset = tf.data.Dataset.from_tensor_slices(data)
        if shuffle:
            dataset = dataset.shuffle(int(dataset.cardinality()))
        dataset = dataset.batch(batch_size or 32)
    return dataset.map(
        task.preprocess_samples, num_parallel_calls=tf.data.AUTOTUNE
    ).prefetch(tf.data.AUTOTUNE)


def check_batched(x):
    """Raises if a raw task input is one example, not a batch of them.

    Args:
        x: Raw inputs: a list or array of strings, images..., or a dict
            (or tuple) of them.

    Raises:
        ValueError: For a single value (a string, a number), naming it and
            the list it should be.
    """
    values = x.values() if isinstance(x, dict) else x if isinstance(x, tuple) else [x]
    for value in values:
        if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
            shown = reprlib.repr(value)
            raise ValueError(
                "A KerasHub task takes a batch of raw inputs: a list or array "
                "of strings (or a dict of them), one per example. Received "
                f"a single {type(value).__name__}: {shown}. Wrap it in a "
                f"list: [{shown}]."
            )


def preprocessed_arrays(model, x):
    """`task_arrays` of the KerasHub task a `PVeRAModel` adapts (`task_of`)."""
    return task_arrays(task_of(model), x)


def task_arrays(task, x):
    """A KerasHub task's raw inputs `x`, preprocessed, as NumPy arrays.

    Args:
        task: A KerasHub task, or `None` (see `task_batches`).
        x: Raw inputs as for the task's `predict`, not a dataset.

    Returns:
        The preprocessed inputs joined into arrays (a structure of them),
        or `x` itself when the model has no preprocessor.
    """
    dataset = task_batches(task, x)
    if dataset is None:
        return x
    batches = []
    for element in dataset.as_numpy_iterator():
        if isinstance(element, tuple):
            element, _, _ = keras.utils.unpack_x_y_sample_weight(element)
        batches.append(element)
    return keras.tree.map_structure(lambda *b: np.concatenate(b), *batches)
