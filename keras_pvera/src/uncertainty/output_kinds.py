"""Whether a model outputs logits or probabilities.

Class statistics (entropies, mutual information, temperature scaling, the
calibration error) read an output either as logits or as probabilities. The
model says which: a KerasHub task by its `activation`, a Keras model by the
activation of the layer that produces each output. `output_kinds` reads it
(a `PVeRAModel` adds its calibration's, `calibrated_kinds`);
`from_logits_like` arranges it like the outputs.

Example:

>>> import keras
>>> model = keras.Sequential([keras.Input((4,)),
...                           keras.layers.Dense(3, activation="softmax")])
>>> output_kinds(model)
[False]
"""

import keras

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
    if callable(getattr(type(layer), "sampled_model", None)):
        return layer.sampled_model().output_kinds  # A nested `PVeRAModel`.
    if isinstance(layer, keras.Model):
        return output_kinds(layer)
    return None


def output_kinds(model):
    """Whether each output of `model` is logits, from the model itself.

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
    producers = _output_producers(model)
    if keras_hub_tasks.keras_hub_task(model) and hasattr(model, "activation"):
        return [_activation_from_logits(model.activation)]
    if producers is None:
        return None
    kinds = []
    for layer, index in producers:
        from_layer = _layer_from_logits(layer)
        kinds.append(from_layer[index] if index < len(from_layer or ()) else None)
    return kinds


def _output_producers(model):
    """`(layer, index)` per output of `model`: the layer producing it, and
    which of that layer's outputs it is; `None` for a model without a
    graph to read (a subclassed model)."""
    graph = keras_internals.graph_of(model)
    if graph is not None:
        return [keras_internals.graph_producer_of(tensor) for tensor in graph.outputs]
    if isinstance(model, keras.Sequential) and model.layers:
        return [(model.layers[-1], 0)]  # Sequential layers have one output.
    return None


def calibrated_kinds(kinds, calibration):
    """The output kinds of a model whose outputs a calibration tempers.

    Temperature scaling keeps logits logits and probabilities
    probabilities, so a `PVeRAModel` outputs what its base model outputs;
    where the base does not say, the calibration's `from_logits` does.

    Args:
        kinds: The base model's `output_kinds`.
        calibration: `None`, or `{"temperature": T, "from_logits": bool}`.

    Returns:
        The kinds, as `output_kinds` gives them.
    """
    if calibration is None:
        return kinds
    return [calibration["from_logits"] if k is None else k for k in kinds or [None]]


def check_from_logits(from_logits):
    """Refuses a `from_logits` that is not `None` (from the model), `True`
    or `False`."""
    if from_logits is not None and not isinstance(from_logits, bool):
        raise ValueError(
            "`from_logits` must be None (from the model), True or False. "
            f"Received: from_logits={from_logits!r}"
        )


def single_output_kind(kinds):
    """The kind of a model's one output: `True`, `False` or `None` (unknown,
    or not one output), from its `kinds`."""
    return kinds[0] if kinds and len(kinds) == 1 else None


def from_logits_like(kinds, outputs):
    """Whether each of `outputs` is logits, from the model's `kinds`.

    Args:
        kinds: What `output_kinds` says of the model that returned them.
        outputs: Its outputs: an array, or a list or dict of arrays.

    Returns:
        `True`, `False` or `None` (unknown; see `output_kinds`) per output,
        arranged like `outputs`.
    """
    leaves = keras.tree.flatten(outputs)
    if kinds is None or len(kinds) != len(leaves):
        kinds = [single_output_kind(kinds)] * len(leaves)
    return keras.tree.pack_sequence_as(outputs, kinds)
