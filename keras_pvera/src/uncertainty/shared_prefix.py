"""Monte Carlo passes that run the part of a model before its sampling once.

`predict_with_uncertainty` sends a batch repeated `copies` times through
the model, so that every copy draws its own noise. Everything a model
computes before its first sampling layer is the same for every copy: with
sampling in the top layers only (`sampled_layers`), or adapters on the top
layers only, that is most of the model.

Inside `repeating(copies, sampling_layers)`, `call_model(model, inputs)`
(which `PVeRAModel.call` uses to call its base model) takes a batch *once*
and returns what the model gives for it repeated `copies` times: it walks
the model's Functional graph (and the graphs of Functional models inside
it, such as a KerasHub task's backbone), runs each layer that holds no
sampling layer and reads only such once-computed tensors on the batch
itself, and repeats a tensor `copies` times where a layer that samples, or
already reads repeated tensors, first needs it. The sampling layers see
exactly the repeated batch they would see otherwise, so they draw the same
noise: the outputs equal those of the repeated batch sent through the
whole model (to float32 rounding).

Models that are not Functional graphs (subclassed models, Sequential
models without a graph) and layers whose inner computation is not a graph
(a KerasHub transformer block holding an adapted layer) are run on the
repeated batch as a whole.
"""

import contextlib
import threading

import keras
from keras import ops

from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.utils import keras_internals

_state = threading.local()


def sampling_holders(sampling_layers):
    """`holds(operation)`: whether an operation is, or holds, one of
    `sampling_layers` (the `PVeRADense` layers that draw noise).

    Each operation's answer is found once (walking its sublayers) and kept,
    so that one function can serve every call of a Monte Carlo run.
    """
    sampling = {id(layer) for layer in sampling_layers}
    answers = {}

    def holds(operation):
        key = id(operation)
        if key not in answers:
            layers = [operation, *(v.layer for v in layer_walk.walk(operation))]
            answers[key] = any(id(layer) in sampling for layer in layers)
        return answers[key]

    return holds


class Repetition:
    """How one call repeats its batch: `copies`, and which layers sample.

    Args:
        copies: How many copies of the batch the outputs hold.
        holds_sampling: `(operation) -> bool`, from `sampling_holders`:
            whether an operation draws noise; every other operation gives
            each copy the same output.
    """

    def __init__(self, copies, holds_sampling):
        self.copies = int(copies)
        self.samples = holds_sampling

    def repeat(self, tensor):
        """`copies` copies of `tensor` along its first axis.

        (A Keras graph passes padding masks as tensors of their own, which
        are repeated like any other.)
        """
        if self.copies == 1:
            return tensor
        return ops.concatenate([tensor] * self.copies, axis=0)


@contextlib.contextmanager
def repeating(copies, holds_sampling):
    """Within this context, `call_model` repeats each batch `copies` times.

    Compiled predict functions bake the context in: drop them when it
    opens or closes (`predict_with_uncertainty` does).

    Args:
        copies: A positive integer.
        holds_sampling: From `sampling_holders`: which operations draw
            noise.
    """
    outer = getattr(_state, "repetition", None)
    _state.repetition = Repetition(copies, holds_sampling)
    try:
        yield
    finally:
        _state.repetition = outer


def call_model(model, inputs, training=None):
    """`model(inputs)`, or, within `repeating`, its outputs for `inputs`
    repeated `copies` times, the part before sampling run once."""
    repetition = getattr(_state, "repetition", None)
    if repetition is None:
        return model(inputs, training=training)
    graph = keras_internals.graph_of(model)
    if not keras_internals.runs_own_graph(model) or not _batched(graph.inputs):
        # No graph to walk: the repeated batch through the whole model.
        return model(_map_tensors(repetition.repeat, inputs), training=training)
    flat = keras_internals.standardized_inputs(graph, inputs)
    outputs, once = _run_graph(repetition, graph, flat, training)
    outputs = [
        repetition.repeat(value) if is_once and _batched([tensor]) else value
        for tensor, value, is_once in zip(graph.outputs, outputs, once, strict=True)
    ]
    return keras_internals.graph_outputs(graph, outputs)


def _run_graph(repetition, graph, inputs, training):
    """Runs a Functional graph on once-computed `inputs` (one batch).

    Returns:
        A tuple `(outputs, once)`: the graph's flat outputs, and whether
        each is computed once (the same for every copy, not repeated).
    """
    values, once, repeated = {}, {}, {}
    for tensor, value in zip(graph.inputs, inputs, strict=True):
        values[id(tensor)] = value
        once[id(tensor)] = True

    def as_repeated(tensor):
        key = id(tensor)
        if not once[key] or not _batched([tensor]):
            return values[key]
        if key not in repeated:
            repeated[key] = repetition.repeat(values[key])
        return repeated[key]

    for node in keras_internals.nodes_in_order(graph):
        tensors = node.input_tensors
        if any(id(tensor) not in values for tensor in tensors):
            continue  # Not computable, as `Functional.call` skips it.
        operation = node.operation
        all_once = all(once[id(tensor)] for tensor in tensors)
        if all_once and not repetition.samples(operation):
            args, kwargs = keras_internals.node_arguments(node, values)
            outputs = keras_internals.graph_call(operation, training)(*args, **kwargs)
            outputs_once = [True] * len(node.outputs)
        else:
            nested = _nested_graph_call(repetition, node, values, once, training)
            if nested is None:
                filled = {id(tensor): as_repeated(tensor) for tensor in tensors}
                args, kwargs = keras_internals.node_arguments(node, filled)
                call = keras_internals.graph_call(operation, training)
                outputs = call(*args, **kwargs)
                outputs_once = [False] * len(node.outputs)
            else:
                outputs, outputs_once = nested
        flat = keras.tree.flatten(outputs)
        for tensor, value, is_once in zip(
            node.outputs, flat, outputs_once, strict=False
        ):
            values[id(tensor)] = value
            once[id(tensor)] = is_once
    return (
        [values[id(tensor)] for tensor in graph.outputs],
        [once[id(tensor)] for tensor in graph.outputs],
    )


def _nested_graph_call(repetition, node, values, once, training):
    """Runs a node whose operation is itself a Functional graph (a task's
    backbone) on once-computed inputs by walking that graph, so that its
    own first layers run once too. `None` when the node is not such a
    call."""
    operation = node.operation
    args, kwargs = keras_internals.node_arguments(node, values)
    if (
        not keras_internals.runs_own_graph(operation)
        or len(args) != 1
        or set(kwargs) - {"training", "mask"}
        or any(m is not None for m in keras.tree.flatten(kwargs.get("mask")))
    ):
        return None
    graph = keras_internals.graph_of(operation)
    if not _batched(graph.inputs):
        return None
    if not all(once[id(tensor)] for tensor in node.input_tensors):
        return None  # Inputs partly repeated already: run it on repeated ones.
    flat = keras_internals.standardized_inputs(graph, args[0])
    outputs, outputs_once = _run_graph(repetition, graph, flat, training)
    return keras_internals.graph_outputs(graph, outputs), outputs_once


def _batched(tensors):
    """Whether symbolic tensors have an unknown (batch) first axis."""
    return all(len(t.shape) > 0 and t.shape[0] is None for t in tensors)


def _map_tensors(function, structure):
    return keras.tree.map_structure(
        lambda value: function(value) if ops.is_tensor(value) else value,
        structure,
    )
