"""Finding the layers PVeRA adapts, trains in full, or reads back from a file.

Selectors (names, regex, callables, `"all"`), KerasHub's default targets
(`default_lora_layer_names()` of every nested backbone, else attention
projections by name, never a silent `"all"`), a KerasHub task's head, and
layer addresses: the chain of attributes that holds a layer, recorded in
saved files so that they load where Keras names layers otherwise. A
`PVeRADense` is seen as the layer it wraps, and a `TrainedCopies` as its
original layer, at the same path.
"""

import re
import warnings

from keras_pvera.src.layers.linear_map import LINEAR_LAYERS
from keras_pvera.src.layers.linear_map import unsupported_reason
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.layers.trained_copies import TrainedCopies
from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.utils import keras_hub_tasks

# Layers keras_pvera puts in a model's place, each seen as the layer it holds.
WRAPPERS = (PVeRADense, TrainedCopies)

# KerasHub's default LoRA targets (`Backbone.enable_lora`).
KERAS_HUB_TARGETS = ("query", "value", "query_dense", "value_dense")


def adaptable_layers(model):
    """`(path, layer)` of a model's layers, each wrapper seen as one layer.

    The insides of a `PVeRADense` (its base layer, dropout, registry) and
    of a `TrainedCopies` are left out, so that a second adapter selects
    wrapped layers by the base layer's name at the same path.

    Args:
        model: A Keras model.

    Returns:
        A list of `(path, layer)` tuples in model order.
    """
    found, inside = [], ()
    for path, layer in layer_walk.iter_layers(model):
        if inside and path.startswith(inside):
            continue
        found.append((path, layer))
        inside = f"{path}/" if isinstance(layer, WRAPPERS) else ()
    return found


def select_layers(model, selector, what="target"):
    """Resolves a layer selector to `{path: layer}`.

    Args:
        model: A Keras model.
        selector: A list of layer names (each name matches every layer of
            that name at any depth, and must match one), a regex string
            (full match against a layer's name or path), or a callable
            `(layer) -> bool`.
        what: The argument's name, for error messages.

    Returns:
        A dict from path to layer, in model order.

    Raises:
        ValueError: For a bad regex or a name that matches no layer.

    Example:

    >>> import keras
    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(8, name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    >>> list(select_layers(model, ["hidden"]))
    ['hidden']
    """
    layers = adaptable_layers(model)
    if callable(selector) and not isinstance(selector, str):
        return {p: layer for p, layer in layers if selector(seen_as(layer))}
    if isinstance(selector, str):
        try:
            pattern = re.compile(selector)
        except re.error as e:
            raise ValueError(
                f"`{what}` is not a valid regular expression: {e}. "
                f"Received: {what}={selector!r}"
            ) from None
        return {
            p: layer
            for p, layer in layers
            if pattern.fullmatch(layer.name) or pattern.fullmatch(p)
        }
    names = list(selector)
    missing = [n for n in names if not any(lyr.name == n for _, lyr in layers)]
    if missing:
        raise ValueError(
            f"`{what}` name {missing[0]!r} matches no layer of model "
            f"{model.name!r}. Candidates: {_candidates(layers)}"
        )
    return {p: layer for p, layer in layers if layer.name in names}


def _not_wrapper(layer):
    return not isinstance(layer, WRAPPERS)


def seen_as(layer):
    """The layer a wrapper stands for (a base or original layer), else itself."""
    if isinstance(layer, PVeRADense):
        return layer.base_layer
    if isinstance(layer, TrainedCopies):
        return layer.original_layer
    return layer


def _candidates(layers):
    names = sorted(
        {layer.name for _, layer in layers if isinstance(seen_as(layer), LINEAR_LAYERS)}
    )
    return names or sorted({layer.name for _, layer in layers})


def select_targets(model, target):
    """The layers `target` chooses, checked: `{path: adaptable layer/wrapper}`.

    Chosen layers that are not built (sublayers the model never calls, such
    as SAM's mask decoder under its backbone) are skipped with a warning.

    Args:
        model: A built Keras model.
        target: As `PVeRAConfig.target`; `None` as `default_targets`.

    Returns:
        A non-empty dict from path to layer, in model order.

    Raises:
        ValueError: If nothing matches, or no matched layer is built.
        TypeError: If a matched layer is none of the kinds PVeRA adapts
            (`linear_map.ADAPTED_LAYERS`; a convolution with groups=1).
    """
    layers = adaptable_layers(model)
    if target is None:
        chosen = default_targets(model)
    elif target == "all":
        chosen = _all_linear(model, layers)
    else:
        chosen = select_layers(model, target, "target")
    if not chosen:
        raise ValueError(
            f"`target` matches no layer of model {model.name!r}. "
            f"Received: target={target!r}. Candidates: {_candidates(layers)}"
        )
    for path, layer in chosen.items():
        reason = unsupported_reason(seen_as(layer))
        if reason is not None:
            raise TypeError(
                f"target {target!r} matches {path!r}, which PVeRA cannot "
                f"adapt. {reason}"
            )
    unbuilt = [path for path, layer in chosen.items() if not layer.built]
    if len(unbuilt) == len(chosen):
        raise ValueError(
            f"Layer {unbuilt[0]!r} is not built. Build the model first: call it "
            "on a batch of data (`model(x[:1])`) or call "
            "`model.build(input_shape)`."
        )
    if unbuilt:
        warnings.warn(
            f"keras_pvera: {len(unbuilt)} chosen layers are not built (the "
            f"model never calls them), so they are not adapted: {unbuilt[:5]}"
            f"{' ...' if len(unbuilt) > 5 else ''}.",
            stacklevel=5,
        )
    return {p: layer for p, layer in chosen.items() if p not in unbuilt}


# Names (of the layer, or of the attribute holding it) of attention
# projections that `default_targets` falls back on: the query and value
# sides, and fused projections (adapted as one layer).
ATTENTION_PROJECTIONS = (
    "query",
    "value",
    "query_dense",
    "value_dense",
    "query_proj",
    "value_proj",
    "q_proj",
    "v_proj",
    "q_dense",
    "v_dense",
    "query_projector",
    "value_projector",
    "q",
    "v",
    "kv",
    "qkv",
    "query_key_value",
    "attention_qkv",
    "in_proj_qkv",
)


def keras_hub_backbones(model):
    """The KerasHub backbones in `model` (itself included), outermost first."""
    backbone_class = keras_hub_tasks.keras_hub_model_class("Backbone")
    if backbone_class is None:
        return []
    layers = [model] + [layer for _, layer in layer_walk.iter_layers(model)]
    return [layer for layer in layers if isinstance(layer, backbone_class)]


def default_targets(model):
    """The layers `target=None` adapts: `{path: layer}`.

    In a KerasHub model, the layers named in its backbones'
    `default_lora_layer_names()` (keras-hub 0.22+; nested backbones such as
    a vision encoder included; KerasHub's `query`, `value`, `query_dense`,
    `value_dense` on older keras-hub), as `backbone.enable_lora` does, plus
    the attention projections (`ATTENTION_PROJECTIONS`, by layer or
    attribute name) of blocks those names miss, such as Qwen3.5's
    linear-attention `in_proj_qkv`, with a warning that names them. If it
    has none of the names, its attention projections, with a warning; if
    none either, a `ValueError` naming candidates. In another model:
    KerasHub's names when it has such layers, else `"all"`.

    Args:
        model: A Keras model.

    Returns:
        A dict from path to layer, in model order.

    Raises:
        ValueError: For a KerasHub model with neither.
    """
    layers = adaptable_layers(model)
    linear = [(p, lyr) for p, lyr in layers if isinstance(seen_as(lyr), LINEAR_LAYERS)]
    backbones = keras_hub_backbones(model)
    if not backbones:
        chosen = {p: lyr for p, lyr in linear if lyr.name in KERAS_HUB_TARGETS}
        return chosen or _all_linear(model, layers)
    names = []
    for backbone in backbones:
        own = getattr(backbone, "default_lora_layer_names", None)
        names += own() if callable(own) else list(KERAS_HUB_TARGETS)
    names = list(dict.fromkeys(names))
    chosen = {p: lyr for p, lyr in linear if lyr.name in names}
    # Attention blocks (the layer directly holding a projection) none of
    # whose layers the names chose: all of them when the names match
    # nothing, else those the names miss, such as Qwen3.5's linear-attention
    # layers (`linear_attn/in_proj_qkv`) beside `self_attention/query`.
    covered = {path.rpartition("/")[0] for path in chosen}
    held_as = _attribute_names(model)
    missed = {
        p: lyr
        for p, lyr in linear
        if (
            lyr.name in ATTENTION_PROJECTIONS
            or held_as.get(id(lyr)) in ATTENTION_PROJECTIONS
        )
        and p.rpartition("/")[0] not in covered
    }
    if not chosen and not missed:
        raise ValueError(
            f"Model {model.name!r} has none of its KerasHub default LoRA layers "
            f"{names} and no attention projection named one of "
            f"{list(ATTENTION_PROJECTIONS)}. Pass `target` (layer names, a "
            f"regex, a callable or 'all'). Candidates: {_candidates(layers)}"
        )
    if missed:
        found = sorted(
            {
                lyr.name if lyr.name in ATTENTION_PROJECTIONS else held_as[id(lyr)]
                for lyr in missed.values()
            }
        )
        why = (
            f"has attention blocks without any of its KerasHub default LoRA "
            f"layers {names}, so PVeRA also adapts their projections"
            if chosen
            else f"has none of its KerasHub default LoRA layers {names}, so "
            "PVeRA adapts its attention projections"
        )
        warnings.warn(
            f"keras_pvera.apply(target=None): model {model.name!r} {why} "
            f"{found} ({len(missed)} layers; fused projections as one layer "
            "each). Pass `target` to choose others.",
            stacklevel=6,
        )
    return {p: lyr for p, lyr in linear if p in chosen or p in missed}


def _all_linear(model, layers):
    excluded = {id(layer) for layer in layer_walk.output_layers(model)}
    return {
        p: layer
        for p, layer in layers
        if isinstance(seen_as(layer), LINEAR_LAYERS)
        and id(layer) not in excluded
        and not isinstance(layer, TrainedCopies)  # Trained in full already.
    }


def _attribute_names(model):
    """`{id(layer): name of the attribute holding it}`, underscores stripped."""
    return {
        id(child): key.split("[")[0].lstrip("_")
        for _, address, child in layer_walk.walk(model, enter=_not_wrapper)
        for key in [address.rsplit("/", 1)[-1]]
        if not key.startswith(("@", "#"))
    }


def layers_at(model, paths, what="layer"):
    """`{path: layer}` for given paths, or a ValueError naming a missing one."""
    layers = dict(adaptable_layers(model))
    for path in paths:
        if path not in layers:
            raise ValueError(
                f"The model has no {what} at path {path!r}. "
                f"Available: {sorted(layers)[:20]}"
            )
    return {path: layers[path] for path in paths}


def task_head(model):
    """`{path: layer}` of the layers a KerasHub task adds on its backbone.

    These are the task's own sublayers that hold weights, other than its
    `backbone` and `preprocessor` (for example `TextClassifier`'s `logits`).
    They are freshly initialised for a new task, so `apply` trains them in
    full by default, as PEFT's `modules_to_save` does for classifier heads.

    Args:
        model: A Keras model.

    Returns:
        A dict from path to layer, in model order; empty for a model that is
        not a KerasHub task.
    """
    if not keras_hub_tasks.keras_hub_task(model):
        return {}
    parts = {
        id(getattr(model, "backbone", None)),
        id(getattr(model, "preprocessor", None)),
    }
    return {
        path: layer
        for path, layer in adaptable_layers(model)
        if "/" not in path and id(layer) not in parts and layer.weights
    }


def layer_addresses(model, paths):
    """Where each layer sits in `model`, independent of layer names.

    A layer's address is the chain of keys from the model down to it
    (`layer_walk.walk`; a wrapper stands where its base layer stood), with
    its class: two builds of one architecture give
    their layers the same addresses whatever names Keras or the model's
    `name` gave them, on every backend.

    Args:
        model: A Keras model.
        paths: Paths (as `adaptable_layers` gives them) of layers of `model`.

    Returns:
        A dict from path to `[address, class name]`, the address a
        `/`-separated string; a wrapped layer has its base layer's class.

    Example:

    >>> import keras
    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(8, name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    >>> layer_addresses(model, ["head"])
    {'head': ['@2', 'Dense']}
    """
    wanted = {id(layer): path for path, layer in layers_at(model, paths).items()}
    found = {
        wanted[id(child)]: [address, type(seen_as(child)).__name__]
        for _, address, child in layer_walk.walk(model, enter=_not_wrapper)
        if id(child) in wanted
    }
    return {path: found[path] for path in paths}


def resolve_paths(model, paths, addresses=None, what="layer"):
    """Finds stored layer paths in `model`, by name or else by address.

    When every path names a layer of `model`, those are the layers. Else
    (the model was built again, under another name, or in another process,
    so Keras numbered or prefixed its layers otherwise) every path is found
    by its stored address (`layer_addresses`), and the layer there must be
    of the stored class.

    Args:
        model: A Keras model (a base model, or an adapted one's base).
        paths: Stored paths.
        addresses: A dict from stored path to `[address, class name]`, or
            `None` (files written before addresses: names only).
        what: What the layers are, for error messages.

    Returns:
        A dict from stored path to the layer's path in `model`.

    Raises:
        ValueError: Naming the first path that is in neither place, or
            whose address holds a layer of another class.
    """
    layers = dict(adaptable_layers(model))
    if all(path in layers for path in paths):
        return {path: path for path in paths}
    addresses = addresses or {}
    missing = next(p for p in paths if p not in layers)
    if not all(path in addresses for path in paths):
        raise ValueError(
            f"The model has no {what} at path {missing!r}. "
            f"Available: {sorted(layers)[:20]}"
        )
    path_of = {id(layer): path for path, layer in layers.items()}
    resolved = {}
    for path in paths:
        address, class_name = addresses[path]
        layer = layer_walk.layer_at_address(model, address)
        if layer is None or id(layer) not in path_of:
            raise ValueError(
                f"The model has no {what} at path {path!r}, nor at its "
                f"address {address!r}: it is not the architecture the "
                f"{what} was saved from. Available: {sorted(layers)[:20]}"
            )
        if type(seen_as(layer)).__name__ != class_name:
            raise ValueError(
                f"The {what} {path!r} was a {class_name}, but the model's "
                f"layer at its address {address!r} ({path_of[id(layer)]!r}) "
                f"is a {type(seen_as(layer)).__name__}: it is not the "
                f"architecture the {what} was saved from."
            )
        resolved[path] = path_of[id(layer)]
    return resolved
