"""Finding layers inside a Keras model and swapping them in place.

A model is a tree of layers: Functional and Sequential models hold layers in
their graph, every layer holds sublayers in its attributes (possibly inside
lists, tuples or dicts). Every layer gets a path made of layer names from the
model down to it, such as `"transformer_layer_0/self_attention/query"`.

`replace_layers` swaps layers everywhere a model refers to them: attributes,
the layer tracker, and the nodes of Functional graphs, so that calling,
training and saving all see the new layers. It returns a function that undoes
the swap.
"""

import keras

from keras_pvera import keras_internals


def _layers_in(value):
    if isinstance(value, keras.layers.Layer):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, keras.layers.Layer)]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, keras.layers.Layer)]
    return []


def child_layers(layer):
    """The direct sublayers of `layer`, in a stable order, each once.

    Graph layers of a Functional or Sequential model come first (in graph
    order), then layers held by attributes, then any other tracked sublayer.

    Args:
        layer: A Keras layer or model.

    Returns:
        A list of layers.
    """
    found = {}
    if isinstance(layer, keras.Sequential):
        candidates = list(layer.layers)
    elif keras_internals.is_graph(layer):
        candidates = [
            op
            for op in keras_internals.graph_operations(layer)
            if isinstance(op, keras.layers.Layer)
        ]
    else:
        candidates = []
    for _, value in keras_internals.layer_attributes(layer):
        candidates.extend(_layers_in(value))
    candidates.extend(keras_internals.tracked_layers(layer) or [])
    # A Sequential model runs an internal Functional of the same layers.
    internal = keras_internals.internal_functional(layer)
    for child in candidates:
        if (
            child is layer
            or child is internal
            or isinstance(child, keras.layers.InputLayer)
        ):
            continue
        found.setdefault(id(child), child)
    return list(found.values())


def iter_layers(model):
    """Yields `(path, layer)` for every layer below `model`, each once.

    Args:
        model: A Keras model or layer.

    Yields:
        Tuples of a `/`-separated path of layer names and the layer.

    Example:

    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs))
    >>> [path for path, _ in iter_layers(model)]
    ['head']
    """
    seen = {id(model)}

    def visit(layer, prefix):
        names = {}
        for child in child_layers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = child.name
            names[name] = names.get(name, 0) + 1
            if names[name] > 1:
                name = f"{name}#{names[name] - 1}"
            path = f"{prefix}/{name}" if prefix else name
            yield path, child
            yield from visit(child, path)

    yield from visit(model, "")


def output_layers(model):
    """The Dense/EinsumDense layers that produce `model`'s outputs.

    Found through Functional graphs (descending into nested Functional and
    Sequential models). Subclassed models have no graph to read: none.

    Args:
        model: A Keras model.

    Returns:
        A list of layers.
    """
    graph = keras_internals.graph_of(model)
    if graph is None:
        return []
    found = []
    for tensor in keras.tree.flatten(graph.outputs):
        producer = keras_internals.producer_of(tensor)
        if isinstance(producer, (keras.layers.Dense, keras.layers.EinsumDense)):
            found.append(producer)
        elif isinstance(producer, keras.Model):
            found.extend(output_layers(producer))
    return found


def _set_attribute(layer, name, value):
    with keras_internals.unlocked(layer):
        setattr(layer, name, value)


def _replace_in_list(items, replacements):
    changed = []
    for i, item in enumerate(items):
        if id(item) in replacements:
            changed.append((i, item))
            items[i] = replacements[id(item)]
    return changed


def _replace_in_graph(graph, replacements, undo):
    for operations in keras_internals.graph_operation_lists(graph):
        for i, old in _replace_in_list(operations, replacements):
            undo.append(lambda lst=operations, i=i, old=old: lst.__setitem__(i, old))
    for node in keras_internals.graph_nodes(graph):
        old = node.operation
        if id(old) in replacements:
            new = replacements[id(old)]
            node.operation = new
            keras_internals.move_nodes(old, new)
            undo.append(lambda node=node, old=old: setattr(node, "operation", old))


def _replace_in_layer(layer, replacements, undo):
    with keras_internals.unlocked(layer):
        _replace_in_attributes(layer, replacements, undo)
    graph = keras_internals.graph_of(layer)
    if graph is not None:
        _replace_in_graph(graph, replacements, undo)


def _replace_in_attributes(layer, replacements, undo):
    tracked = keras_internals.tracked_layers(layer)
    if tracked is not None:
        # Restored last, after the attributes, so that it wins.
        snapshot = list(tracked)
        undo.append(lambda: tracked.__setitem__(slice(None), snapshot))
    for name, value in list(keras_internals.layer_attributes(layer)):
        if isinstance(value, keras.layers.Layer):
            if id(value) in replacements:
                _set_attribute(layer, name, replacements[id(value)])
                undo.append(
                    lambda name=name, old=value: _set_attribute(layer, name, old)
                )
        elif isinstance(value, list):
            for i, old in _replace_in_list(value, replacements):
                undo.append(lambda lst=value, i=i, old=old: lst.__setitem__(i, old))
        elif isinstance(value, tuple):
            if any(id(v) in replacements for v in value):
                new = type(value)(replacements.get(id(v), v) for v in value)
                _set_attribute(layer, name, new)
                undo.append(
                    lambda name=name, old=value: _set_attribute(layer, name, old)
                )
        elif isinstance(value, dict):
            for key, old in list(value.items()):
                if id(old) in replacements:
                    value[key] = replacements[id(old)]
                    undo.append(
                        lambda d=value, key=key, old=old: d.__setitem__(key, old)
                    )
    if tracked is not None:
        # The new layer takes the old one's place; `setattr` may also have
        # appended it at the end.
        rebuilt, seen = [], set()
        for item in tracked:
            item = replacements.get(id(item), item)
            if id(item) not in seen:
                seen.add(id(item))
                rebuilt.append(item)
        tracked[:] = rebuilt


def replace_layers(model, replacements):
    """Swaps layers in place everywhere `model` refers to them.

    Args:
        model: The Keras model to change.
        replacements: A dict `{old_layer: new_layer}` (layers are hashable by
            identity).

    Returns:
        A function of no arguments that undoes the swap.
    """
    by_id = {id(old): new for old, new in replacements.items()}
    containers = [model] + [layer for _, layer in iter_layers(model)]
    undo = []
    try:
        for container in containers:
            _replace_in_layer(container, by_id, undo)
    except Exception:
        for step in reversed(undo):
            step()
        raise

    def restore():
        for step in reversed(undo):
            step()

    return restore
