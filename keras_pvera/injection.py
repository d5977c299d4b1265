"""Putting PVeRA adapters into a Keras model and taking them out again.

`Injection` is the record of what PVeRA changed in one base model: which
layers it wrapped in `PVeRADense` layers, the named adapters each wrapper
holds, which layers train in full (`trainable_layers`), and what it froze.
It selects layers, wraps them, swaps the wrappers in (`model_surgery`),
freezes the rest, and undoes all of that on failure, on `delete`, and on
`unload`. `PVeRAModel` holds one; nothing else changes a model's structure.
"""

import re
import sys
import warnings

import keras

from keras_pvera import keras_internals
from keras_pvera import model_surgery
from keras_pvera.projection_registry import ProjectionRegistry
from keras_pvera.pvera_dense import PVeRADense
from keras_pvera.pvera_dense import derive_seed
from keras_pvera.pvera_dense import linear_equation_of

LINEAR_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense)

# KerasHub's default LoRA targets (`Backbone.enable_lora`).
KERAS_HUB_TARGETS = ("query", "value", "query_dense", "value_dense")


def adaptable_layers(model):
    """`(path, layer)` of a model's layers, each wrapper seen as one layer.

    The insides of a `PVeRADense` (its base layer, dropout, registry) are
    left out, so that a second adapter selects wrapped layers by the base
    layer's name at the same path.

    Args:
        model: A Keras model.

    Returns:
        A list of `(path, layer)` tuples in model order.
    """
    found, inside = [], ()
    for path, layer in model_surgery.iter_layers(model):
        if inside and path.startswith(inside):
            continue
        found.append((path, layer))
        inside = f"{path}/" if isinstance(layer, PVeRADense) else ()
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

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(8, name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    >>> list(select_layers(model, ["hidden"]))
    ['hidden']
    """
    layers = adaptable_layers(model)
    if callable(selector) and not isinstance(selector, str):
        return {p: layer for p, layer in layers if selector(_seen_as(layer))}
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


def _seen_as(layer):
    return layer.base_layer if isinstance(layer, PVeRADense) else layer


def _candidates(layers):
    names = sorted(
        {
            layer.name
            for _, layer in layers
            if isinstance(_seen_as(layer), LINEAR_LAYERS)
        }
    )
    return names or sorted({layer.name for _, layer in layers})


def select_targets(model, target):
    """The layers `target` chooses, checked: `{path: Dense/EinsumDense/wrapper}`.

    Chosen layers that are not built (sublayers the model never calls, such
    as SAM's mask decoder under its backbone) are skipped with a warning.

    Args:
        model: A built Keras model.
        target: As `PVeRAConfig.target`; `None` as `default_targets`.

    Returns:
        A non-empty dict from path to layer, in model order.

    Raises:
        ValueError: If nothing matches, or no matched layer is built.
        TypeError: If a matched layer is not a Dense or EinsumDense.
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
        if not isinstance(_seen_as(layer), LINEAR_LAYERS):
            raise TypeError(
                f"PVeRA adapts keras.layers.Dense and keras.layers.EinsumDense "
                f"layers, but target {target!r} matches {path!r} of type "
                f"{type(layer).__name__}."
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
            stacklevel=4,
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
    keras_hub = sys.modules.get("keras_hub")
    backbone_class = getattr(getattr(keras_hub, "models", None), "Backbone", None)
    if backbone_class is None:
        return []
    layers = [model] + [layer for _, layer in model_surgery.iter_layers(model)]
    return [layer for layer in layers if isinstance(layer, backbone_class)]


def default_targets(model):
    """The layers `target=None` adapts: `{path: layer}`.

    In a KerasHub model, the layers named in its backbones'
    `default_lora_layer_names()` (keras-hub 0.22+; nested backbones such as
    a vision encoder included; KerasHub's `query`, `value`, `query_dense`,
    `value_dense` on older keras-hub), as `backbone.enable_lora` does. If
    it has none, its attention projections (`ATTENTION_PROJECTIONS`, by
    layer or attribute name), with a warning that names them; if none
    either, a `ValueError` naming candidates. In another model: KerasHub's
    names when it has such layers, else `"all"`.

    Args:
        model: A Keras model.

    Returns:
        A dict from path to layer, in model order.

    Raises:
        ValueError: For a KerasHub model with neither.
    """
    layers = adaptable_layers(model)
    linear = [(p, lyr) for p, lyr in layers if isinstance(_seen_as(lyr), LINEAR_LAYERS)]
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
    if chosen:
        return chosen
    held_as = _attribute_names(model)
    chosen = {
        p: lyr
        for p, lyr in linear
        if lyr.name in ATTENTION_PROJECTIONS
        or held_as.get(id(lyr)) in ATTENTION_PROJECTIONS
    }
    if not chosen:
        raise ValueError(
            f"Model {model.name!r} has none of its KerasHub default LoRA layers "
            f"{names} and no attention projection named one of "
            f"{list(ATTENTION_PROJECTIONS)}. Pass `target` (layer names, a "
            f"regex, a callable or 'all'). Candidates: {_candidates(layers)}"
        )
    found = sorted(
        {
            lyr.name if lyr.name in ATTENTION_PROJECTIONS else held_as[id(lyr)]
            for lyr in chosen.values()
        }
    )
    warnings.warn(
        f"keras_pvera.apply(target=None): model {model.name!r} has none of its "
        f"KerasHub default LoRA layers {names}, so PVeRA adapts its attention "
        f"projections {found} ({len(chosen)} layers; fused projections as one "
        "layer each). Pass `target` to choose others.",
        stacklevel=5,
    )
    return chosen


def _all_linear(model, layers):
    excluded = {id(layer) for layer in model_surgery.output_layers(model)}
    return {
        p: layer
        for p, layer in layers
        if isinstance(_seen_as(layer), LINEAR_LAYERS) and id(layer) not in excluded
    }


def _attribute_names(model):
    """`{id(layer): name of the attribute holding it}`, underscores stripped."""
    names, seen = {}, {id(model)}

    def visit(layer):
        for key, child in _child_addresses(layer).values():
            if id(child) in seen:
                continue
            seen.add(id(child))
            if not key.startswith(("@", "#")):
                names[id(child)] = key.split("[")[0].lstrip("_")
            if not isinstance(child, PVeRADense):
                visit(child)

    visit(model)
    return names


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


def keras_hub_task(model):
    """Whether `model` is a KerasHub `Task` (keras-hub is not imported here).

    Args:
        model: A Keras model.

    Returns:
        True for a `keras_hub.models.Task` (a classifier, a causal LM...).
    """
    keras_hub = sys.modules.get("keras_hub")
    task_class = getattr(getattr(keras_hub, "models", None), "Task", None)
    return task_class is not None and isinstance(model, task_class)


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
    if not keras_hub_task(model):
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


def _child_addresses(layer):
    """`{id(child): (key, child)}`: each direct sublayer and how `layer` holds it.

    The key is the attribute holding the child (`"encoder"`,
    `"transformer_layers[0]"`, `"heads[query]"`), else its place among the
    graph's layers (`"@3"`), else among the tracked ones (`"#3"`). A child
    held several ways takes the smallest key, so that the key depends on
    neither layer names nor the backend's attribute order.
    """
    found = {}

    def offer(rank, key, child):
        if (
            not isinstance(child, keras.layers.Layer)
            or child is layer
            or isinstance(child, keras.layers.InputLayer)
        ):
            return
        old = found.get(id(child))
        if old is None or (rank, key) < old[0]:
            found[id(child)] = ((rank, key), child)

    for name, value in keras_internals.held_sublayers(layer):
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                offer(0, f"{name}[{i}]", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                offer(0, f"{name}[{key}]", item)
        else:
            offer(0, name, value)
    graph = []
    if isinstance(layer, keras.Sequential):
        graph = list(layer.layers)
    elif keras_internals.is_graph(layer):
        graph = keras_internals.graph_operations(layer)
    for i, child in enumerate(graph):
        offer(1, f"@{i}", child)
    for i, child in enumerate(keras_internals.tracked_layers(layer) or []):
        offer(2, f"#{i}", child)
    internal = keras_internals.internal_functional(layer)
    found.pop(id(internal), None)
    return {
        i: (key.replace("/", "%2F"), child) for i, ((_, key), child) in found.items()
    }


def layer_addresses(model, paths):
    """Where each layer sits in `model`, independent of layer names.

    A layer's address is the chain of keys (`_child_addresses`) from the
    model down to it, with its class: two builds of one architecture give
    their layers the same addresses whatever names Keras or the model's
    `name` gave them, on every backend.

    Args:
        model: A Keras model.
        paths: Paths (as `adaptable_layers` gives them) of layers of `model`.

    Returns:
        A dict from path to `[address, class name]`, the address a
        `/`-separated string; a wrapped layer has its base layer's class.

    Example:

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(8, name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    >>> layer_addresses(model, ["head"])
    {'head': ['@2', 'Dense']}
    """
    wanted = {id(layer): path for path, layer in layers_at(model, paths).items()}
    found, seen = {}, {id(model)}

    def visit(layer, address):
        for key, child in _child_addresses(layer).values():
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_address = f"{address}/{key}" if address else key
            if id(child) in wanted:
                found[wanted[id(child)]] = [
                    child_address,
                    type(_seen_as(child)).__name__,
                ]
            if not isinstance(child, PVeRADense):
                visit(child, child_address)

    visit(model, "")
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
        layer = _layer_at_address(model, address)
        if layer is None or id(layer) not in path_of:
            raise ValueError(
                f"The model has no {what} at path {path!r}, nor at its "
                f"address {address!r}: it is not the architecture the "
                f"{what} was saved from. Available: {sorted(layers)[:20]}"
            )
        if type(_seen_as(layer)).__name__ != class_name:
            raise ValueError(
                f"The {what} {path!r} was a {class_name}, but the model's "
                f"layer at its address {address!r} ({path_of[id(layer)]!r}) "
                f"is a {type(_seen_as(layer)).__name__}: it is not the "
                f"architecture the {what} was saved from."
            )
        resolved[path] = path_of[id(layer)]
    return resolved


def _layer_at_address(model, address):
    layer = model
    for key in address.split("/"):
        children = {k: child for k, child in _child_addresses(layer).values()}
        if key not in children:
            return None
        layer = children[key]
    return layer


def check_base_model(model):
    """Raises unless `model` is a built Keras model not yet adapted."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            "keras_pvera.apply adapts a keras.Model. Received: "
            f"{model!r} of type {type(model).__name__}"
        )
    if getattr(model, "injection", None) is not None or any(
        isinstance(layer, PVeRADense) for _, layer in model_surgery.iter_layers(model)
    ):
        raise ValueError(
            f"Model {model.name!r} is already adapted with PVeRA. Apply PVeRA "
            "to the original model once; to add another adapter, call "
            "`model.add_adapter(name, ...)` on the adapted model."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built, so its layer sizes are "
            "unknown. Call it on a batch of data (`model(x[:1])`) or call "
            "`model.build(input_shape)` before keras_pvera.apply."
        )


class AdapterRecord:
    """A named adapter of a model: its settings and the paths it adapts."""

    def __init__(self, config, paths):
        self.config = config
        self.paths = list(paths)


class Injection:
    """What PVeRA changed in one base model, to extend or undo.

    Args:
        model: The base Keras model (changed in place).

    Example:

    >>> from keras_pvera.pvera_config import PVeRAConfig
    >>> base = keras.Sequential([keras.Input((4,)),
    ...                          keras.layers.Dense(8, name="hidden"),
    ...                          keras.layers.Dense(2, name="head")])
    >>> injection = Injection(base)
    >>> injection.add("default", PVeRAConfig(rank=2, target=["hidden"]))
    >>> list(injection.wrappers), [w.name for w in base.trainable_weights]
    (['hidden'], ['pvera_lambda_d', 'pvera_lambda_b'])
    >>> injection.unload()
    >>> [w.name for w in base.trainable_weights]
    ['kernel', 'bias', 'kernel', 'bias']
    """

    def __init__(self, model):
        self.model = model
        self.registry = None
        self.wrappers = {}
        self.adapters = {}
        self.trainable_paths = []
        self.active = None
        # id(base layer) -> its trainable flag before it was wrapped
        self.base_trainable = {}
        # (layer or variable, its trainable flag before PVeRA froze it)
        self.frozen = []

    def add(self, name, config, paths=None, trainable_paths=None):
        """Adds a named adapter: selects, wraps, swaps in and freezes.

        The first adapter makes the shared projection registry and becomes
        active; later ones must fit it. Every check runs before anything
        changes, and a failure part-way undoes what was done.

        Args:
            name: The adapter's name.
            config: Its `PVeRAConfig`.
            paths: Paths of the layers to adapt, instead of `config.target`
                (used when loading).
            trainable_paths: Paths of layers trained in full, instead of
                `config.trainable_layers` (used when loading).

        Raises:
            ValueError: For a name in use, a selection that matches nothing,
                or a config that does not fit the shared registry.
        """
        first = not self.adapters
        if name in self.adapters:
            raise ValueError(
                f"The model already has an adapter named {name!r}. Adapters: "
                f"{list(self.adapters)}. Delete it first, or pick another name."
            )
        if paths is None:
            targets = select_targets(self.model, config.target)
        else:
            targets = layers_at(self.model, paths, "adapted layer")
        trainable = self._select_trainable(config, trainable_paths, targets)
        overlap = sorted(set(targets) & set(trainable))
        if overlap:
            raise ValueError(
                f"Layer {overlap[0]!r} is both a PVeRA target and in "
                "`trainable_layers`; a layer is either adapted or trained "
                "in full."
            )
        registry = self.registry or _make_registry(config, targets)
        self._check_fits(name, config, registry, targets)
        undo, new = [], {}
        try:
            for i, (path, layer) in enumerate(targets.items()):
                layer_config = config.replace(
                    seed=derive_seed(config.seed, i),
                    target=None,
                    trainable_layers=None,
                )
                if isinstance(layer, PVeRADense):
                    layer.add_adapter(name, layer_config)
                    undo.append(lambda w=layer: w.delete_adapter(name))
                    continue
                activation, was_trainable = layer.activation, layer.trainable
                self.base_trainable[id(layer)] = was_trainable
                undo.append(
                    lambda lyr=layer, a=activation, t=was_trainable: (
                        setattr(lyr, "activation", a),
                        setattr(lyr, "trainable", t),
                    )
                )
                new[path] = PVeRADense(
                    layer,
                    config=layer_config,
                    projection_registry=registry,
                    adapter_name=name,
                    name=layer.name,
                )
            swap_back = model_surgery.replace_layers(
                self.model, {targets[p]: w for p, w in new.items()}
            )
            undo.append(swap_back)
            if first:
                self.active = name
            for wrapper in new.values():
                # A new wrapper starts with `name` active: match the model.
                wrapper.set_active_adapter(self.active)
            self.wrappers.update(new)
            self.registry = registry
            self.adapters[name] = AdapterRecord(config, targets)
            self.trainable_paths = list(trainable)
            self.freeze()
        except Exception:
            for path in new:
                self.wrappers.pop(path, None)
            self.adapters.pop(name, None)
            if first:
                self.active = None
            for step in reversed(undo):
                step()
            raise

    def _select_trainable(self, config, trainable_paths, targets):
        if trainable_paths is not None:
            return layers_at(self.model, trainable_paths, "trainable layer")
        if config.trainable_layers is None:
            if self.adapters:
                return layers_at(self.model, self.trainable_paths)
            # A KerasHub task's head trains by default (not where adapted).
            head = task_head(self.model)
            return {p: layer for p, layer in head.items() if p not in targets}
        chosen = select_layers(self.model, config.trainable_layers, "trainable_layers")
        if self.adapters and list(chosen) != self.trainable_paths:
            raise ValueError(
                "`trainable_layers` are shared by every adapter of a model "
                f"(now {self.trainable_paths}); a new adapter cannot change "
                f"them. Received: trainable_layers={config.trainable_layers!r}"
            )
        return chosen

    def _check_fits(self, name, config, registry, targets):
        for setting in ("seed", "rank", "save_projection"):
            if getattr(config, setting) != getattr(registry, setting):
                raise ValueError(
                    f"Adapter {name!r} has {setting}="
                    f"{getattr(config, setting)!r}, but every adapter of a "
                    "model shares one projection registry, made with "
                    f"{setting}={getattr(registry, setting)!r}. Use "
                    f"{setting}={getattr(registry, setting)!r} (the "
                    "projections cannot grow: their values depend on rank "
                    "and seed), or adapt the base model again."
                )
        for path, layer in targets.items():
            linear = linear_equation_of(_seen_as(layer))
            if linear.in_dim > registry.in_max or linear.out_dim > registry.out_max:
                raise ValueError(
                    f"Adapter {name!r} targets {path!r} ({linear.in_dim} -> "
                    f"{linear.out_dim}), larger than the shared projections "
                    f"({registry.in_max} -> {registry.out_max}) made for the "
                    "first adapter's layers. Target layers no larger than "
                    "those, or adapt the base model again with all targets."
                )

    def delete(self, name):
        """Removes a named adapter; wrappers left with none are unwrapped."""
        record = self.adapters.pop(name)
        emptied = {}
        for path in record.paths:
            wrapper = self.wrappers[path]
            wrapper.delete_adapter(name)
            if not wrapper.adapter_names:
                emptied[path] = wrapper
        self._unwrap(emptied)
        if self.active == name:
            self.active = None

    def set_active(self, name):
        """Makes `name` (or `None`: no adapter) the adapter that runs and trains."""
        for wrapper in self.wrappers.values():
            wrapper.set_active_adapter(name)
        self.active = name

    def layers_of(self, name):
        """`{path: wrapper}` of the layers adapter `name` adapts (none: {})."""
        if name is None:
            return {}
        return {path: self.wrappers[path] for path in self.adapters[name].paths}

    def trainable_ids(self):
        """Ids of the variables that may train: the active adapter's vectors
        and the weights of the layers trained in full."""
        ids = set()
        if self.active is not None:
            for wrapper in self.layers_of(self.active).values():
                ids.update((id(wrapper.lambda_d), id(wrapper.lambda_b)))
        for layer in layers_at(self.model, self.trainable_paths).values():
            ids.update(id(w) for w in layer.weights)
        return ids

    def freeze(self):
        """Freezes everything but adapter vectors and `trainable_layers`.

        Layers with nothing trainable inside are set `trainable=False` (so
        that, for example, BatchNormalization runs in inference mode); layers
        holding adapters keep `trainable=True` with their own weights
        frozen. Called again, it puts back what a `trainable` toggle thawed.
        """
        keep = {
            id(w)
            for wrapper in self.wrappers.values()
            for vectors in wrapper.adapter_vectors.values()
            for w in vectors.weights
        }
        for layer in layers_at(self.model, self.trainable_paths).values():
            keep.update(id(w) for w in layer.weights)
        recorded = {id(item) for item, _ in self.frozen}
        for _, layer in model_surgery.iter_layers(self.model):
            if isinstance(layer, PVeRADense):
                layer.trainable = layer.trainable  # Freezes its base again.
            elif layer.trainable and not any(id(w) in keep for w in layer.weights):
                self._set_untrainable(layer, recorded)
        for weight in self.model.weights:
            if weight.trainable and id(weight) not in keep:
                self._set_untrainable(weight, recorded)

    def _set_untrainable(self, item, recorded):
        if id(item) not in recorded:
            self.frozen.append((item, item.trainable))
            recorded.add(id(item))
        item.trainable = False

    def unload(self):
        """Takes every adapter out: the original layers, activations and
        trainable flags are back in place."""
        self._unwrap(self.wrappers)
        for item, was_trainable in reversed(self.frozen):
            item.trainable = was_trainable
        self.frozen = []
        self.adapters = {}
        self.active = None

    def _unwrap(self, wrappers):
        if not wrappers:
            return
        model_surgery.replace_layers(
            self.model, {w: w.base_layer for w in wrappers.values()}
        )
        for path, wrapper in list(wrappers.items()):
            base = wrapper.base_layer
            base.activation = wrapper.activation or keras.activations.linear
            base.trainable = self.base_trainable.pop(id(base), True)
            self.wrappers.pop(path, None)


def _make_registry(config, targets):
    linears = [linear_equation_of(_seen_as(layer)) for layer in targets.values()]
    return ProjectionRegistry(
        rank=config.rank,
        in_max=max(linear.in_dim for linear in linears),
        out_max=max(linear.out_dim for linear in linears),
        seed=config.seed,
        save_projection=config.save_projection,
        name="projection_registry",
    )
