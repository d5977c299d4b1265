"""The one walk over a model's layers that every part of keras_pvera uses.

A model is a tree of layers: Functional and Sequential models hold layers
in their graph, and every layer holds sublayers in its attributes
(possibly inside lists, tuples or dicts). The walk gives each layer below
a model, once, two names:

- a **path** of layer names, `"transformer_layer_0/self_attention/query"`
  (a name repeated among siblings gets `#1`, `#2`...): what users select
  and read;
- an **address** of the keys by which each parent holds the next: the
  attribute (`"encoder"`, `"transformer_layers[0]"`, `"heads[query]"`),
  else the place in the parent's graph (`"@3"`), else among its tracked
  sublayers (`"#3"`). Two builds of one architecture give a layer the same
  address whatever names Keras gave them, on every backend: saved files
  find their layers by it.
"""

import typing

import keras

from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.utils import keras_internals


class LayerVisit(typing.NamedTuple):
    """One layer met by `walk`: its path, its address and the layer."""

    path: str
    address: str
    layer: keras.layers.Layer


def children(layer):
    """The direct sublayers of `layer` and their keys, each once.

    In a stable order: the graph's layers of a Functional or Sequential
    model first (in graph order), then layers held by attributes, then any
    other tracked sublayer. A child held several ways takes the key of the
    first of: an attribute (the smallest name), a graph place, a tracked
    place, so that keys depend on neither layer names nor the backend's
    attribute order.

    Args:
        layer: A Keras layer or model.

    Returns:
        A list of `(key, child)` tuples.
    """
    if isinstance(layer, keras.Sequential):
        graph = list(layer.layers)
    elif keras_internals.is_graph(layer):
        graph = keras_internals.graph_operations(layer)
    else:
        graph = []
    offers = []  # (rank, key, child), in walk order.
    for i, child in enumerate(graph):
        offers.append((1, f"@{i}", child))
    for name, value in keras_internals.held_attributes(layer):
        if isinstance(value, (list, tuple)):
            offers.extend((0, f"{name}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, dict):
            offers.extend((0, f"{name}[{k}]", item) for k, item in value.items())
        else:
            offers.append((0, name, value))
    tracked = keras_internals.tracked_layers(layer) or []
    offers.extend((2, f"#{i}", child) for i, child in enumerate(tracked))
    # A Sequential model runs an internal Functional of the same layers.
    internal = keras_internals.internal_functional(layer)
    order, best = [], {}
    for rank, key, child in offers:
        if (
            not isinstance(child, keras.layers.Layer)
            or child is layer
            or child is internal
            or isinstance(child, keras.layers.InputLayer)
        ):
            continue
        if id(child) not in best:
            order.append(child)
        if id(child) not in best or (rank, key) < best[id(child)]:
            best[id(child)] = (rank, key)
    return [(best[id(child)][1].replace("/", "%2F"), child) for child in order]


def walk(model, enter=None):
    """Yields a `LayerVisit` for every layer below `model`, each once.

    Args:
        model: A Keras model or layer.
        enter: Optional `(layer) -> bool`: whether to walk below a layer
            (default: below every layer).

    Yields:
        `LayerVisit(path, address, layer)`, parents before their children.

    Example:

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(8, name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    >>> [(v.path, v.address) for v in walk(model)]
    [('hidden', '@1'), ('head', '@2')]
    """
    seen = {id(model)}

    def visit(layer, path, address):
        names = {}
        for key, child in children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = child.name
            names[name] = names.get(name, 0) + 1
            if names[name] > 1:
                name = f"{name}#{names[name] - 1}"
            child_path = f"{path}/{name}" if path else name
            child_address = f"{address}/{key}" if address else key
            yield LayerVisit(child_path, child_address, child)
            if enter is None or enter(child):
                yield from visit(child, child_path, child_address)

    yield from visit(model, "", "")


def iter_layers(model):
    """Yields `(path, layer)` for every layer below `model`, each once."""
    for visit in walk(model):
        yield visit.path, visit.layer


def layer_at_address(model, address):
    """The layer at `address` below `model` (see `walk`), or `None`."""
    layer = model
    for key in address.split("/"):
        layer = dict(children(layer)).get(key)
        if layer is None:
            return None
    return layer


def pvera_layers(model):
    """`(path, PVeRADense)` of every PVeRA layer below `model`.

    The one test of whether a model is adapted: it holds PVeRA layers.
    """
    return [(v.path, v.layer) for v in walk(model) if isinstance(v.layer, PVeRADense)]


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
