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

Repeating a once-computed tensor gives what the repeated batch gives only
if the tensor holds the batch on its first axis. The walk checks it on
every tensor it repeats: the graph must leave that axis unknown (`None`)
and the tensor must have as many rows as the batch (a tensor whose shape
the graph knows in full has no batch axis, and is passed on as it is).
Where one does not
(KerasHub's SAM prompt encoder gives its positional embeddings one row,
which the mask decoder broadcasts to the batch; a tensor with the batch on
another axis), the walk stops and the whole model runs on the repeated
batch, its sampling layers' noise generators set back to where they were
when the walk began, so that they draw the same noise.

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
        noise_generators: The sampling layers' `keras.random.SeedGenerator`s,
            set back to their states when a walk that falls back began.
    """

    def __init__(self, copies, holds_sampling, noise_generators=()):
        self.copies = int(copies)
        self.samples = holds_sampling
        self.noise_generators = list(noise_generators)

    def repeat(self, tensor):
        """`copies` copies of `tensor` along its first axis.

        (A Keras graph passes padding masks as tensors of their own, which
        are repeated like any other.)
        """
        if self.copies == 1:
            return tensor
        return ops.concatenate([tensor] * self.copies, axis=0)


class _Unproven(Exception):
    """The walk met a once-computed tensor it cannot show holds the batch
    on its first axis, so repeating it may not give the repeated batch's."""


@contextlib.contextmanager
def repeating(copies, holds_sampling, noise_generators=()):
    """Within this context, `call_model` repeats each batch `copies` times.

    Compiled predict functions bake the context in: drop them when it
    opens or closes (`predict_with_uncertainty` does).

    Args:
        copies: A positive integer.
        holds_sampling: From `sampling_holders`: which operations draw
            noise.
        noise_generators: The seed generators of the sampling layers (see
            `Repetition`).
    """
    outer = getattr(_state, "repetition", None)
    _state.repetition = Repetition(copies, holds_sampling, noise_generators)
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
    states = [ops.copy(g.state.value) for g in repetition.noise_generators]
    try:
        rows = _rows_of(flat)
        outputs, once = _run_graph(repetition, graph, flat, training, rows)
        outputs = [
            _repeated(repetition, tensor, value, rows) if is_once else value
            for tensor, value, is_once in zip(graph.outputs, outputs, once, strict=True)
        ]
    except _Unproven:
        # The repeated batch through the whole model, drawing the noise the
        # walk drew again.
        for generator, state in zip(repetition.noise_generators, states, strict=True):
            generator.state.assign(state)
        return model(_map_tensors(repetition.repeat, inputs), training=training)
    return keras_internals.graph_outputs(graph, outputs)


def _run_graph(repetition, graph, inputs, training, rows):
    """Runs a Functional graph on once-computed `inputs` (one batch of
    `rows` examples).

    Returns:
        A tuple `(outputs, once)`: the graph's flat outputs, and whether
        each is computed once (the same for every copy, not repeated).

    Raises:
        _Unproven: Where a once-computed tensor that must be repeated does
            not hold the batch on its first axis.
    """
    values, once, repeated = {}, {}, {}
    for tensor, value in zip(graph.inputs, inputs, strict=True):
        values[id(tensor)] = value
        once[id(tensor)] = True

    def as_repeated(tensor):
        key = id(tensor)
        if not once[key]:
            return values[key]
        if key not in repeated:
            repeated[key] = _repeated(repetition, tensor, values[key], rows)
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
            nested = _nested_graph_call(repetition, node, values, once, training, rows)
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


def _nested_graph_call(repetition, node, values, once, training, rows):
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
    outputs, outputs_once = _run_graph(repetition, graph, flat, training, rows)
    return keras_internals.graph_outputs(graph, outputs), outputs_once


def _repeated(repetition, tensor, value, rows):
    """The once-computed `value` of the symbolic `tensor`, as every copy
    of the batch has it.

    A tensor of fully known shape has no batch axis and is the same for
    every copy (DINOv3's rotary embeddings): `value` itself. Any other is
    repeated if `tensor` has an unknown first axis and `value` `rows`
    rows (on TensorFlow, a traced batch of unknown size gives `None` for
    both); else `_Unproven`.
    """
    if None not in tuple(tensor.shape):
        return value
    if not _batched([tensor]) or _leading_size(value) != rows:
        raise _Unproven(tensor)
    return repetition.repeat(value)


def _rows_of(values):
    """The batch size the input `values` share; `_Unproven` if they differ."""
    sizes = {_leading_size(value) for value in values}
    if len(sizes) != 1:
        raise _Unproven(sizes)
    return sizes.pop()


def _leading_size(value):
    """The size of a value's first axis (`None`: unknown in a trace)."""
    shape = tuple(getattr(value, "shape", ()))
    if not shape:
        return -1  # No first axis: matches no batch.
    return shape[0]


def _batched(tensors):
    """Whether symbolic tensors have an unknown (batch) first axis."""
    return all(len(t.shape) > 0 and t.shape[0] is None for t in tensors)


def _map_tensors(function, structure):
    return keras.tree.map_structure(
        lambda value: function(value) if ops.is_tensor(value) else value,
        structure,
    )
