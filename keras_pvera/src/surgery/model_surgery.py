"""Swapping layers inside a built Keras model, in place.

`replace_layers` swaps layers everywhere a model refers to them: attributes,
the layer tracker, and the nodes of Functional graphs, so that calling,
training and saving all see the new layers. It returns a function that undoes
the swap.
"""

import copy

import keras

from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.utils import keras_internals


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


def _replaced(items, replacements):
    return [replacements.get(id(item), item) for item in items]


def _replace_in_graph(graph, replacements, undo):
    lists = keras_internals.graph_operation_lists(graph)
    if any(id(op) in replacements for op in lists["_operations"]):
        new = {"_operations": _replaced(lists["_operations"], replacements)}
        if "_operations_by_depth" in lists:
            by_depth = copy.copy(lists["_operations_by_depth"])  # A defaultdict.
            for depth, operations in by_depth.items():
                by_depth[depth] = _replaced(operations, replacements)
            new["_operations_by_depth"] = by_depth
        keras_internals.set_graph_operation_lists(graph, new)
        undo.append(lambda: keras_internals.set_graph_operation_lists(graph, lists))
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
    for name, value in list(keras_internals.held_attributes(layer)):
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
    containers = [model] + [layer for _, layer in layer_walk.iter_layers(model)]
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
