"""Whether a model outputs logits or probabilities, and values that cannot be.

Class statistics (entropies, mutual information, temperature scaling, the
calibration error) read an output either as logits or as probabilities. The
model says which: a KerasHub task by its `activation`, a Keras model by the
activation of the layer that produces each output. `from_logits_like` reads
it; `probability_problem` says what keeps values from being probabilities,
for outputs read as probabilities.

Example:

>>> import keras
>>> model = keras.Sequential([keras.Input((4,)),
...                           keras.layers.Dense(3, activation="softmax")])
>>> from_logits_like(model, np.zeros((2, 3)))
False
>>> probability_problem(np.array([[2.0, -1.0]]))
'values from -1 to 2, outside [0, 1]'
"""

import keras
import numpy as np

from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.utils import keras_hub_tasks
from keras_pvera.src.utils import keras_internals

# What an output activation says about the values: True for logits, False
# for probabilities. `log_softmax` gives log-probabilities, which a softmax
# reads as logits. Any other activation says nothing.
_FROM_LOGITS_OF_ACTIVATION = {
    "linear": True,
    "log_softmax": True,
    "softmax": False,
    "sigmoid": False,
}


def _activation_from_logits(activation):
    """True, False or None (unknown) for an activation, a name or `None`."""
    if activation is None:  # PVeRADense keeps a linear activation as None.
        return True
    if isinstance(activation, str):
        activation = keras.activations.get(activation)
    return _FROM_LOGITS_OF_ACTIVATION.get(getattr(activation, "__name__", None))


def _layer_from_logits(layer):
    """What the layer producing an output says, per output of that layer."""
    if isinstance(layer, keras.layers.Softmax):
        return [False]
    if isinstance(
        layer,
        (
            keras.layers.Dense,
            keras.layers.EinsumDense,
            keras.layers.Activation,
            PVeRADense,
        ),
    ):
        return [_activation_from_logits(layer.activation)]
    if isinstance(layer, keras.Model):
        return output_kinds(layer)
    return None


def is_adapted_model(model):
    """Whether `model` is a `PVeRAModel` (read without importing it).

    Uncertainty sits below the model in the package (the model's
    `predict_with_uncertainty` calls it), so it knows a `PVeRAModel` by
    what it holds: the base model it adapts and its temperature scaling.
    """
    calibration = getattr(type(model), "calibration", None)
    return isinstance(calibration, property) and isinstance(
        getattr(model, "base_model", None), keras.Model
    )


def output_kinds(model):
    """Whether each output of `model` is logits, from the model itself.

    - A `PVeRAModel` outputs what its base model outputs (temperature
      scaling keeps logits logits and probabilities probabilities); where
      the base does not say, a calibration's `from_logits` does.
    - A KerasHub task with an `activation` (`TextClassifier`,
      `ImageClassifier`...): linear or `None` means logits, softmax or
      sigmoid probabilities.
    - A Functional or Sequential model: the activation of the layer that
      produces each output (`Dense`/`EinsumDense` `activation`, an
      `Activation` or `Softmax` layer, or a nested model's own outputs).

    Args:
        model: A Keras model.

    Returns:
        A list with one entry per output, in `keras.tree.flatten` order of
        what the model returns: `True` (logits), `False` (probabilities) or
        `None` (the model does not say: another activation, another kind
        of output layer). `None` instead of a list when the outputs cannot
        be read (a subclassed model).
    """
    if is_adapted_model(model):
        kinds = output_kinds(model.base_model)
        calibration = model.calibration
        if calibration is None:
            return kinds
        if kinds is None:
            kinds = [None]
        return [calibration["from_logits"] if k is None else k for k in kinds]
    if keras_hub_tasks.keras_hub_task(model) and hasattr(model, "activation"):
        return [_activation_from_logits(model.activation)]
    graph = keras_internals.graph_of(model)
    if graph is None:
        if isinstance(model, keras.Sequential) and model.layers:
            return _layer_from_logits(model.layers[-1])
        return None
    kinds = []
    for tensor in graph.outputs:
        layer, index = keras_internals.graph_producer_of(tensor)
        from_layer = _layer_from_logits(layer)
        kinds.append(from_layer[index] if index < len(from_layer or ()) else None)
    return kinds


def from_logits_like(model, outputs):
    """Whether each of `outputs` (what `model` returned) is logits.

    Args:
        model: A Keras model.
        outputs: Its outputs: an array, or a list or dict of arrays.

    Returns:
        `True`, `False` or `None` (unknown; see `output_kinds`) per output,
        arranged like `outputs`.
    """
    leaves = keras.tree.flatten(outputs)
    kinds = output_kinds(model)
    if kinds is None or len(kinds) != len(leaves):
        kinds = [kinds[0] if kinds and len(kinds) == 1 else None] * len(leaves)
    return keras.tree.pack_sequence_as(outputs, kinds)


def _tolerance(dtype):
    """How far values may stray from [0, 1] and rows from a sum of 1."""
    try:
        eps = float(np.finfo(dtype).eps)
    except ValueError:  # bfloat16 (ml_dtypes), integers: as coarse as bfloat16.
        eps = 2.0**-7
    return max(1e-3, 8 * eps)


def probability_problem(values):
    """What keeps `values` from being class probabilities, or `None`.

    Probabilities are finite, lie in `[0, 1]`, and, along a last axis of
    more than one class, sum to 1. A last axis of size 1 (or values with
    one axis) holds the probability of class 1. The tolerance is `1e-3`,
    or 8 epsilons of a coarser dtype (float16, bfloat16).

    Args:
        values: An array (or anything `np.asarray` takes).

    Returns:
        `None` if the values can be probabilities, else a short description
        of what was found, to put in an error message.

    Example:

    >>> probability_problem(np.array([[0.2, 0.8], [0.5, 0.5]])) is None
    True
    >>> probability_problem(np.array([[0.9, 0.8]]))
    'rows of 2 classes summing to 1.7 to 1.7, not 1'
    """
    values = np.asarray(values)
    tolerance = _tolerance(values.dtype)
    values = values.astype("float64")
    if values.size == 0:
        return None
    if not np.all(np.isfinite(values)):
        return "NaN or infinite values"
    low, high = values.min(), values.max()
    if low < -tolerance or high > 1.0 + tolerance:
        return f"values from {low:.4g} to {high:.4g}, outside [0, 1]"
    if values.ndim >= 2 and values.shape[-1] > 1:
        sums = values.sum(axis=-1)
        if np.any(np.abs(sums - 1.0) > tolerance):
            return (
                f"rows of {values.shape[-1]} classes summing to "
                f"{sums.min():.4g} to {sums.max():.4g}, not 1"
            )
    return None


def not_probabilities_error(reading, problem, from_logits):
    """The `ValueError` for values read as probabilities that cannot be.

    Args:
        reading: What reads which values, such as "`predictive_entropy`
            reads output 'probs'".
        problem: What was found, from `probability_problem`.
        from_logits: `False` (said to be probabilities) or `None` (nothing
            said whether they are logits or probabilities).

    Returns:
        A `ValueError` to raise.
    """
    if from_logits is False:
        reason = "(from_logits=False)"
    else:
        reason = (
            "since nothing says whether it holds logits or probabilities "
            "(neither `from_logits` nor an output activation that is linear, "
            "softmax or sigmoid)"
        )
    return ValueError(
        f"{reading} as probabilities {reason}, but it holds {problem}. "
        "Probabilities lie in [0, 1] and sum to 1 over the class axis. If "
        "the values are logits, pass `from_logits=True`."
    )
