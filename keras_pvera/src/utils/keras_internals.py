"""Every private Keras attribute keras_pvera reads or writes, in one place.

Keras has no public API to swap a layer inside a built model, to add a
variable to a built layer, or to reach a `Dense` layer's raw kernel when
Keras' own LoRA is on. These small functions do it, each saying which
private attribute of Keras 3 (checked against 3.12 to 3.15) it relies on, so
that a Keras upgrade that moves one breaks here and nowhere else.
"""

import contextlib

import keras
from keras.src.trainers import data_adapters

# Attributes that hold a layer's bookkeeping, not its structure: walking a
# layer's sublayers skips them (they hold the same layers again, graph nodes,
# or TensorFlow's checkpoint records).
BOOKKEEPING_ATTRIBUTES = frozenset(
    [
        "_layers",
        "_tracker",
        "_inbound_nodes",
        "_outbound_nodes",
        "_operations",
        "_functional",
        "_operations_by_depth",
        "_nodes_by_depth",
        "_nodes",
        "_losses_override",
        "_nnx_op_mapping",
        "nnx_operations",
    ]
)


def is_graph(layer):
    """Whether `layer` is a Functional model (it has `_nodes_by_depth`)."""
    return isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth")


def graph_of(layer):
    """The Functional graph that runs `layer`, if any.

    A Sequential model runs an internal Functional model held in
    `_functional`; a Functional model is its own graph.
    """
    if isinstance(layer, keras.Sequential):
        return layer._functional
    if is_graph(layer):
        return layer
    return None


def graph_operations(graph):
    """The graph's operations, in order (`Functional._operations`)."""
    return graph._operations


def graph_operation_lists(graph):
    """A graph's lists of operations: `{"_operations": [...]}` and, in Keras
    versions that have it, `{"_operations_by_depth": {depth: [...]}}`."""
    lists = {"_operations": graph._operations}
    by_depth = getattr(graph, "_operations_by_depth", None)
    if by_depth is not None:
        lists["_operations_by_depth"] = by_depth
    return lists


def set_graph_operation_lists(graph, lists):
    """Gives a graph new lists of operations (`graph_operation_lists`' form).

    New lists, not the old ones changed in place: TensorFlow tracks the
    graph's lists for saving and refuses to save (`tf_saved_model` export,
    `tf.train.Checkpoint`) a tracked list whose items were replaced. Keras'
    own tracking is off meanwhile, so that the operations are not added to
    the graph's layers a second time.
    """
    from keras.src.utils import tracking

    with tracking.DotNotTrackScope(), unlocked(graph):
        for name, value in lists.items():
            setattr(graph, name, value)


def graph_nodes(graph):
    """Every node of a Functional graph (`_nodes_by_depth`)."""
    return [node for nodes in graph._nodes_by_depth.values() for node in nodes]


def nodes_in_order(graph):
    """A Functional graph's nodes that run, in the order its `call` runs them.

    `_nodes_by_depth`, deepest first, as `Function._run_through_graph`
    walks it; input nodes and nodes without an operation are left out.
    """
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                yield node


def node_arguments(node, values):
    """A node's call arguments `(args, kwargs)`, its symbolic tensors
    replaced by `values[id(tensor)]` (`node.arguments.fill_in`)."""
    return node.arguments.fill_in(values)


def graph_call(operation, training):
    """`operation` as a Functional model's `call` runs it: `training` is
    passed to the layers whose `call` takes it (`functional.operation_fn`)."""
    from keras.src.models import functional

    return functional.operation_fn(operation, training=training)


def runs_own_graph(model):
    """Whether `model.call` is `Functional.call` (it only runs its graph),
    so that running its graph node by node is the same computation."""
    from keras.src.models import functional

    graph = graph_of(model)
    return (
        graph is not None
        and type(graph).call is functional.Functional.call
        and (graph is model or type(model).call is keras.Sequential.call)
    )


def standardized_inputs(graph, inputs):
    """A Functional graph's inputs, flat in its inputs' order, as its
    `call` makes them (`Functional._standardize_inputs`)."""
    return graph._standardize_inputs(inputs)


def graph_outputs(graph, flat):
    """Flat output values in a Functional graph's output structure, as its
    `call` returns them (`_outputs_struct`, a single output unwrapped)."""
    outputs = keras.tree.pack_sequence_as(graph._outputs_struct, list(flat))
    if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
        return outputs[0]
    return outputs


def move_nodes(old, new):
    """Gives `new` the graph nodes of `old` (`_inbound_nodes`, `_outbound_nodes`).

    Keras reads a layer's nodes when it serializes a Functional model.
    """
    new._inbound_nodes = old._inbound_nodes
    new._outbound_nodes = old._outbound_nodes


def internal_functional(layer):
    """A Sequential model's internal Functional model (`_functional`), or None."""
    return getattr(layer, "_functional", None)


def tracked_layers(layer):
    """The list of sublayers Keras tracks for `layer` (`_layers`), or None."""
    return getattr(layer, "_layers", None)


def held_attributes(layer):
    """`(attribute name, value)` of a layer's attributes that may hold layers.

    Bookkeeping attributes are left out. On the torch backend, sublayers
    live in torch's module registry (`_modules`): they come under their
    attribute names, where the registry stands among the attributes, so
    that the names are the same on every backend. Attributes whose names
    start with `_self_` are TensorFlow's checkpoint records (lists and
    dicts), left out, unless one holds a layer directly (such as KerasHub's
    `_self_attention_layer`).
    """
    modules = vars(layer).get("_modules")
    modules = modules if isinstance(modules, dict) else {}
    items = {}
    for name, value in vars(layer).items():
        if name == "_modules":
            items.update(modules)
        elif name not in modules:
            items[name] = value
    for name, value in items.items():
        if name in BOOKKEEPING_ATTRIBUTES or name.startswith("__"):
            continue
        if name.startswith("_self_") and not isinstance(value, keras.layers.Layer):
            continue
        yield name, value


def producer_of(tensor):
    """The layer that produced a symbolic tensor (`_keras_history`)."""
    return tensor._keras_history[0]


def graph_producer_of(tensor):
    """The layer a graph now runs to produce a symbolic tensor, and which output.

    `_keras_history` holds the layer that first produced the tensor; the
    graph's node (`_inbound_nodes[node_index]`) holds the layer that runs
    now, which `model_surgery.replace_layers` changes when it wraps one.

    Returns:
        A tuple `(layer, index)`: the layer and the index of the tensor
        among that layer's outputs.
    """
    operation, node_index, tensor_index = tensor._keras_history
    return operation._inbound_nodes[node_index].operation, tensor_index


@contextlib.contextmanager
def unlocked(layer):
    """Lets a built layer accept new variables or sublayers (`_tracker`)."""
    tracker = getattr(layer, "_tracker", None)
    locked = bool(tracker and tracker.locked)
    if locked:
        tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()


def untrack_variable(layer, variable):
    """Removes a variable from a layer (`Layer._untrack_variable`)."""
    layer._untrack_variable(variable)


def kernel_variable(layer):
    """The raw kernel variable of a Dense, EinsumDense or convolution layer
    (`_kernel`), or the raw matrix of an Embedding (`_embeddings`).

    `layer.kernel` (`layer.embeddings`) adds Keras' LoRA update when LoRA is
    enabled; merging and sizing need the stored variable itself.
    """
    if isinstance(layer, keras.layers.Embedding):
        return layer._embeddings
    return layer._kernel


def kernel_shape(layer):
    """The float kernel's shape of a Dense/EinsumDense layer, quantized or not.

    An int4, GPTQ or AWQ layer stores its kernel packed (two 4-bit values a
    byte) and, for GPTQ and AWQ, transposed, so the stored variable's shape
    is not the layer's linear map. Keras records the float shape when it
    builds the quantized variables: `original_kernel_shape` (EinsumDense
    int4, GPTQ, AWQ), `kernel_shape` (Dense GPTQ, AWQ) and
    `_orig_input_dim` / `_orig_output_dim` (Dense int4). Other layers
    (float, int8, float8) store the kernel in its float shape (`_kernel`).
    """
    if layer.quantization_mode in ("int4", "gptq", "awq"):
        for name in ("original_kernel_shape", "kernel_shape"):
            shape = getattr(layer, name, None)
            if shape is not None:
                return tuple(int(d) for d in shape)
        if hasattr(layer, "_orig_output_dim"):
            return (int(layer._orig_input_dim), int(layer._orig_output_dim))
    return tuple(int(d) for d in layer._kernel.shape)


def float_source_policy(policy):
    """The float policy under a quantized one (`_source_name`).

    `"int8_from_float32"` gives `"float32"`.
    """
    return keras.dtype_policies.get(policy._source_name)


def parent_path(layer):
    """The variable-path prefix Keras gave a layer (`_parent_path`)."""
    return getattr(layer, "_parent_path", None)


def set_parent_path(layer, path):
    """Names a wrapper's variables beside the wrapped layer's (`_parent_path`)."""
    layer._parent_path = path


def own_loss_ids(layer):
    """Ids of the losses a layer itself added in the last call.

    `_loss_ids` (losses collected by a stateless scope, as on JAX, where the
    model's `losses` are then handed to `compute_loss` as a list) and
    `_losses` (eager losses), without those of its sublayers.
    """
    return set(layer._loss_ids) | {id(t) for t in layer._losses}


def own_attribute(layer, name):
    """`layer`'s own attribute `name`, or `None`, never through `__getattr__`.

    Reads the instance's `__dict__`, and on torch the module registry
    (`_modules`) where sublayers live, so that a class forwarding missing
    attributes (an adapted KerasHub task) is not asked.
    """
    value = vars(layer).get(name)
    if value is None:
        value = (vars(layer).get("_modules") or {}).get(name)
    return value


def evaluates_cached_validation(fit_kwargs):
    """Whether `fit` is evaluating its validation data (`_use_cached_eval_dataset`).

    Keras' `fit` calls `evaluate` with this private argument on data it
    has prepared already.
    """
    return bool(fit_kwargs.get("_use_cached_eval_dataset"))


def data_adapter(x, batch_size):
    """Keras' data adapter for prediction inputs `x` (`get_data_adapter`).

    The dispatch `model.predict` uses over arrays, `tf.data`, `PyDataset`,
    a torch `DataLoader` and generators (`keras.src.trainers.data_adapters`,
    not exported).
    """
    return data_adapters.get_data_adapter(x, batch_size=batch_size, shuffle=False)


def is_torch_data_loader(x):
    """Whether Keras reads `x` as a torch `DataLoader` (`is_torch_dataloader`)."""
    return data_adapters.is_torch_dataloader(x)


def drop_compiled_functions(model):
    """Makes `model` trace its train, test and predict steps anew.

    JAX and TensorFlow bake Python state (which layers run, whether they
    sample) into the compiled steps. A KerasHub generative task also
    compiles its own `generate` loop, held by the task (or, for an adapted
    task, by its `base_model`): dropped too.
    """
    model.train_function = model.predict_function = model.test_function = None
    for holder in (model, getattr(model, "base_model", None)):
        if getattr(holder, "generate_function", None) is not None:
            holder.generate_function = None


def input_signature(model):
    """The input signature `model.export` would use for `model`
    (`export_utils.get_input_signature`, not exported by Keras): a
    Functional or Sequential model's inputs, or the shapes a subclassed
    model was first called with."""
    from keras.src.export import export_utils

    return export_utils.get_input_signature(model)


def track_torch_parameters(model):
    """Registers every variable of `model` with torch (`_track_variables`).

    On the torch backend a Keras layer hands torch its variables in a
    `ParameterDict` (`_torch_params`) made once, when it is built; layers
    held in lists are not torch submodules. Variables added afterwards (the
    adapters' vectors and projections) would be missing from the model's
    `state_dict`, and torch's exporters (ONNX) refuse to bake such
    trainable tensors in as constants. Does nothing on other backends.
    """
    if keras.backend.backend() == "torch":
        model._track_variables()


def deserialize_model(config):
    """Rebuilds a model from `keras.saving.serialize_keras_object`'s output.

    As `keras.saving.deserialize_keras_object`, except for the compile
    state of a model whose class overrides `compile` (a KerasHub task):
    Keras cannot restore it and warns that `compile()` was not called,
    although such a task compiles itself with its defaults when built. The
    warning would reach every user who loads or merges an adapted task, so
    its `compile_config` is left out there; a model with Keras' own
    `compile` is compiled from it as Keras would.

    Args:
        config: A serialized model (a dict with `class_name` and `config`).

    Returns:
        The rebuilt model.
    """
    # A copy: Keras' `from_config` pops what it reads, and the caller keeps
    # the configuration (a loaded model merges from it later).
    config = plain_copy(config)
    compile_config = config.pop("compile_config", None)
    model = keras.saving.deserialize_keras_object(config)
    if compile_config and type(model).compile is keras.Model.compile:
        model.compile_from_config(compile_config)
        model.compiled = True
    return model


def plain_copy(value):
    """A copy of a configuration made of plain dicts, lists and tuples.

    A stored configuration may be wrapped in Keras' attribute-tracking
    containers (whose trackers point back at a layer); this copies the
    values only.
    """
    if isinstance(value, dict):
        return {key: plain_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_copy(item) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def flatten_layers(layer):
    """Every layer below `layer`, depth first, each once (`_flatten_layers`).

    KerasHub's `Backbone.enable_lora` and `save_lora_weights` number a
    backbone's layers in this order.
    """
    return layer._flatten_layers(include_self=False)


def h5_store(path, mode):
    """Keras' HDF5 variable store (`saving_lib.H5IOStore`), which KerasHub's
    `save_lora_weights` / `load_lora_weights` write and read."""
    from keras.src.saving import saving_lib

    return saving_lib.H5IOStore(path, mode=mode)
