"""Putting PVeRA adapters into a Keras model and taking them out again.

`AdapterRegistry` is the record of what PVeRA changed in one base model: which
layers it wrapped in `PVeRADense` layers, the named adapters each wrapper
holds, which layers train in full (`trainable_layers`), and what it froze.
It wraps the layers `layer_selection` finds, swaps the wrappers in
(`model_surgery`),
freezes the rest, and undoes all of that on failure, on `delete`, and on
`unload`. `PVeRAModel` holds one; nothing else changes a model's structure.
"""

import keras

from keras_pvera.src.layers.projections import ProjectionRegistry
from keras_pvera.src.layers.pvera_config import fused_offsets
from keras_pvera.src.layers.pvera_config import projection_out_max
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.layers.pvera_dense import linear_equation_of
from keras_pvera.src.layers.seeds import derive_seed
from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.surgery import model_surgery
from keras_pvera.src.surgery.layer_selection import layers_at
from keras_pvera.src.surgery.layer_selection import seen_as
from keras_pvera.src.surgery.layer_selection import select_layers
from keras_pvera.src.surgery.layer_selection import select_targets
from keras_pvera.src.surgery.layer_selection import task_head


def check_base_model(model):
    """Raises unless `model` is a built Keras model not yet adapted."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            "keras_pvera.apply adapts a keras.Model. Received: "
            f"{model!r} of type {type(model).__name__}"
        )
    if getattr(model, "adapter_registry", None) is not None or layer_walk.pvera_layers(
        model
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
    """A named adapter of a model: its settings and the paths it adapts.

    The sampling switch is stored in the adapter's layers, which read it in
    every call; `config` reports it from them.

    Args:
        name: The adapter's name.
        config: Its `PVeRAConfig`.
        paths: Paths of the layers it adapts.
        wrappers: The registry's `{path: PVeRADense}` (read, not copied).
    """

    def __init__(self, name, config, paths, wrappers):
        self.name = name
        self.settings = config.replace(sample_at_inference=False)
        self.paths = list(paths)
        self.wrappers = wrappers

    @property
    def config(self):
        """The adapter's `PVeRAConfig`; `sample_at_inference` is on when any
        of its layers samples."""
        sampling = any(
            self.wrappers[path].adapter_vectors[self.name].config.sample_at_inference
            for path in self.paths
        )
        return self.settings.replace(sample_at_inference=sampling)


class AdapterRegistry:
    """What PVeRA changed in one base model, to extend or undo.

    Args:
        model: The base Keras model (changed in place).

    Example:

    >>> from keras_pvera.src.layers.pvera_config import PVeRAConfig
    >>> base = keras.Sequential([keras.Input((4,)),
    ...                          keras.layers.Dense(8, name="hidden"),
    ...                          keras.layers.Dense(2, name="head")])
    >>> adapter_registry = AdapterRegistry(base)
    >>> adapter_registry.add("default", PVeRAConfig(rank=2, target=["hidden"]))
    >>> list(adapter_registry.wrappers), [w.name for w in base.trainable_weights]
    (['hidden'], ['pvera_lambda_d', 'pvera_lambda_b'])
    >>> adapter_registry.unload()
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
        fused = _fused_offsets(config, targets)
        registry = self.registry or _make_registry(config, targets)
        self._check_fits(name, config, registry, targets)
        # A fused group's layers draw the same noise: its first layer's seed.
        noise = config.seed if config.generator_seed is None else config.generator_seed
        seeds = {path: derive_seed(noise, i) for i, path in enumerate(targets)}
        for path, (_, group) in fused.items():
            seeds[path] = seeds[group[0]]
        undo, new = [], {}
        try:
            for path, layer in targets.items():
                layer_config = config.replace(target=None, trainable_layers=None)
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
                    noise_seed=seeds[path],
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
            wrappers = {**self.wrappers, **new}
            for path, (offset, group) in fused.items():
                first = None if path == group[0] else wrappers[group[0]]
                wrappers[path].join_fused_group(name, offset, first)
            self.wrappers.update(new)
            self.registry = registry
            self.adapters[name] = AdapterRecord(name, config, targets, self.wrappers)
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
        fused = _fused_offsets(config, targets)
        for path, layer in targets.items():
            linear = linear_equation_of(seen_as(layer))
            out_end = fused.get(path, (0, None))[0] + linear.out_dim
            if linear.in_dim > registry.in_max or out_end > registry.out_max:
                raise ValueError(
                    f"Adapter {name!r} targets {path!r} ({linear.in_dim} -> "
                    f"{linear.out_dim})"
                    + (f" reading rows up to {out_end} of B" if path in fused else "")
                    + ", larger than the shared projections "
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
        ids = self._trained_in_full_ids()
        for wrapper in self.layers_of(self.active).values():
            ids.update((id(wrapper.lambda_d), id(wrapper.lambda_b)))
        return ids

    def _trained_in_full_ids(self):
        layers = layers_at(self.model, self.trainable_paths).values()
        return {id(w) for layer in layers for w in layer.weights}

    def freeze(self):
        """Freezes everything but adapter vectors and `trainable_layers`.

        Layers with nothing trainable inside are set `trainable=False` (so
        that, for example, BatchNormalization runs in inference mode); layers
        holding adapters keep `trainable=True` with their own weights
        frozen. Called again, it puts back what a `trainable` toggle thawed.
        """
        keep = self._trained_in_full_ids()
        keep.update(
            id(w)
            for wrapper in self.wrappers.values()
            for vectors in wrapper.adapter_vectors.values()
            for w in vectors.weights
        )
        recorded = {id(item) for item, _ in self.frozen}
        for _, layer in layer_walk.iter_layers(self.model):
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


def _out_dims(targets):
    return {
        path: linear_equation_of(seen_as(layer)).out_dim
        for path, layer in targets.items()
    }


def _fused_offsets(config, targets):
    """`{path: (row offset, group)}` for `config.fused_groups`, checked."""
    for group in config.fused_groups or ():
        missing = [path for path in group if path not in targets]
        if missing:
            raise ValueError(
                f"`fused_groups` names layer {missing[0]!r}, which this "
                f"adapter does not adapt. Adapted layers: {list(targets)[:20]}"
            )
        in_dims = {linear_equation_of(seen_as(targets[p])).in_dim for p in group}
        if len(in_dims) > 1:
            raise ValueError(
                f"The layers of fused group {list(group)} have input sizes "
                f"{sorted(in_dims)}; a fused map's parts read one input."
            )
    return fused_offsets(config.fused_groups, _out_dims(targets))


def _make_registry(config, targets):
    linears = [linear_equation_of(seen_as(layer)) for layer in targets.values()]
    return ProjectionRegistry(
        rank=config.rank,
        in_max=max(linear.in_dim for linear in linears),
        out_max=projection_out_max(config.fused_groups, _out_dims(targets)),
        seed=config.seed,
        save_projection=config.save_projection,
        name="projection_registry",
    )
