"""Putting PVeRA adapters into a Keras model and taking them out again.

`AdapterRegistry` is the record of what PVeRA changed in one base model: which
layers it wrapped in `PVeRADense` layers, the named adapters each wrapper
holds, which layers each adapter trains in full (`trainable_layers`: each in
a `TrainedCopies` holding the original and one copy per adapter), and what
it froze. Which adapters are active, enabled or merged, the layers hold
(`AdapterLayer`); the registry asks them.
It wraps the layers `layer_selection` finds, swaps the wrappers in
(`model_surgery`),
freezes the rest, and undoes all of that on failure, on `delete`, and on
`unload`. `PVeRAModel` holds one; nothing else changes a model's structure.
"""

import keras

from keras_pvera.src.layers.adapter_layer import AdapterLayer
from keras_pvera.src.layers.adapter_layer import as_names
from keras_pvera.src.layers.adapter_vectors import join_fused_group
from keras_pvera.src.layers.linear_map import linear_equation_of
from keras_pvera.src.layers.projections import ProjectionRegistry
from keras_pvera.src.layers.pvera_config import fused_offsets
from keras_pvera.src.layers.pvera_config import projection_out_max
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.layers.pvera_embedding import PVeRAEmbedding
from keras_pvera.src.layers.seeds import derive_seed
from keras_pvera.src.layers.trained_copies import TrainedCopies
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
        trainable_paths: Paths of the layers it trains in full.
    """

    def __init__(self, name, config, paths, wrappers, trainable_paths=()):
        self.name = name
        self.settings = config.replace(sample_at_inference=False)
        self.paths = list(paths)
        self.wrappers = wrappers
        self.trainable_paths = list(trainable_paths)

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
        in_place: Whether layers trained in full train in place, shared by
            every adapter, as before keras_pvera kept one copy per adapter
            (models loaded from files written then).

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

    def __init__(self, model, in_place=False):
        self.model = model
        self.in_place = in_place
        self.registry = None
        self.wrappers = {}
        # path -> TrainedCopies of the layers trained in full.
        self.copies = {}
        self.adapters = {}
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
        targets, trainable = self._choose_layers(name, config, paths, trainable_paths)
        fused = _fused_offsets(config, targets)
        registry = self.registry or _make_registry(config, targets)
        self._check_fits(name, config, registry, targets)
        seeds = _noise_seeds(config, targets, fused)
        # What this call made, and how to reverse each step, for a failure.
        undo, new, new_copies = [], {}, {}
        try:
            self._wrap_targets(name, config, registry, targets, seeds, new, undo)
            if not self.in_place:
                self._copy_trainable(name, trainable, new_copies, undo)
            replacements = {targets[p]: w for p, w in new.items()}
            replacements.update({trainable[p]: c for p, c in new_copies.items()})
            undo.append(model_surgery.replace_layers(self.model, replacements))
            active = [name] if first else self.active
            for layer in [*new.values(), *new_copies.values()]:
                # A new wrapper starts with `name` active: match the model.
                layer.set_active_adapter(active)
            _join_fused_groups(name, fused, {**self.wrappers, **new})
            self.wrappers.update(new)
            self.copies.update(new_copies)
            self.registry = registry
            if self.in_place and self.adapters:
                trainable = layers_at(self.model, self.trainable_paths)
            self.adapters[name] = AdapterRecord(
                name, config, targets, self.wrappers, trainable
            )
            self.freeze()
        except Exception:
            self._roll_back(name, new, new_copies, undo, first)
            raise

    def _choose_layers(self, name, config, paths, trainable_paths):
        """`(targets, trainable)`: the `{path: layer}` adapter `name` adapts
        and those it trains in full, checked against the adapters there."""
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
        in_full = set(trainable) | set(self.trainable_paths)
        overlap = sorted(
            (set(targets) & in_full) | (set(trainable) & set(self.wrappers))
        )
        if overlap:
            raise ValueError(
                f"Layer {overlap[0]!r} is both a PVeRA target and in "
                "`trainable_layers`; a layer is either adapted or trained "
                "in full."
            )
        return targets, trainable

    def _wrap_targets(self, name, config, registry, targets, seeds, new, undo):
        """Adds adapter `name` to the targets already wrapped and wraps the
        others, into `new` (`{path: wrapper}`, not yet in the model); `undo`
        gets how to reverse each step."""
        for path, layer in targets.items():
            layer_config = config.replace(target=None, trainable_layers=None)
            if isinstance(layer, PVeRADense):
                layer.add_adapter(name, layer_config)
                undo.append(lambda w=layer: w.delete_adapter(name))
                continue
            self._keep_trainable_flag(layer, undo)
            if hasattr(layer, "activation"):  # (An Embedding has none.)
                undo.append(
                    lambda lyr=layer, a=layer.activation: setattr(lyr, "activation", a)
                )
            wrapper_class = (
                PVeRAEmbedding
                if isinstance(layer, keras.layers.Embedding)
                else PVeRADense
            )
            new[path] = wrapper_class(
                layer,
                config=layer_config,
                projection_registry=registry,
                adapter_name=name,
                noise_seed=seeds[path],
                name=layer.name,
            )

    def _copy_trainable(self, name, trainable, new_copies, undo):
        """Gives adapter `name` its own copy of each layer it trains in full;
        a layer held for the first time goes in a new `TrainedCopies`, into
        `new_copies` (not yet in the model); `undo` as for `_wrap_targets`."""
        for path, layer in trainable.items():
            if path not in self.copies:
                self._keep_trainable_flag(layer, undo)
                new_copies[path] = TrainedCopies(layer)
            holder = self.copies.get(path) or new_copies[path]
            holder.add_copy(name)
            undo.append(lambda h=holder: h.delete_copy(name))

    def _keep_trainable_flag(self, layer, undo):
        """Records `layer`'s trainable flag, put back when it is unwrapped
        (`base_trainable`) or when `add` fails (`undo`)."""
        self.base_trainable[id(layer)] = layer.trainable
        undo.append(lambda lyr=layer, t=layer.trainable: setattr(lyr, "trainable", t))

    def _roll_back(self, name, new, new_copies, undo, first):
        """Undoes a failed `add`: forgets its wrappers, copies and record
        (and, for the first adapter, the projection registry made for it),
        then reverses its steps, last first."""
        if first:
            self.registry = None
        for path in new:
            self.wrappers.pop(path, None)
        for path in new_copies:
            self.copies.pop(path, None)
        self.adapters.pop(name, None)
        for step in reversed(undo):
            step()

    def _select_trainable(self, config, trainable_paths, targets):
        """`{path: layer}` (originals, not copies) the adapter trains in full."""
        if trainable_paths is not None:
            chosen = layers_at(self.model, trainable_paths, "trainable layer")
        elif self.in_place and self.adapters and config.trainable_layers is None:
            chosen = layers_at(self.model, self.trainable_paths)
        elif config.trainable_layers is None:
            # A KerasHub task's head trains by default (not where adapted),
            # for every adapter: PEFT adds a task's classifier to each
            # adapter's modules_to_save.
            head = task_head(self.model)
            chosen = {p: layer for p, layer in head.items() if p not in targets}
        else:
            chosen = select_layers(
                self.model, config.trainable_layers, "trainable_layers"
            )
        if self.in_place and self.adapters and list(chosen) != self.trainable_paths:
            raise ValueError(
                "This model was saved before each adapter trained its own "
                "copy of the layers trained in full, so they are shared by "
                f"every adapter (now {self.trainable_paths}); a new adapter "
                "cannot change them. Received: "
                f"trainable_layers={config.trainable_layers!r}"
            )
        return {
            p: layer.original_layer if isinstance(layer, TrainedCopies) else layer
            for p, layer in chosen.items()
        }

    @property
    def trainable_paths(self):
        """Paths of the layers some adapter trains in full, in model order."""
        paths = [p for r in self.adapters.values() for p in r.trainable_paths]
        return list(dict.fromkeys(paths))

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
        emptied = {}
        for path, holder in self.copies.items():
            holder.delete_copy(name)
            if not holder.adapter_names:
                emptied[path] = holder
        self._unwrap_copies(emptied, keep_trained=False)

    def set_active(self, names):
        """Makes `names` (a list; empty: none) the adapters that run and train.

        Raises:
            ValueError: If two of them train one layer in full (each has its
                own copy; one layer runs one), before anything changes.
        """
        names = as_names(names)
        for path, holder in self.copies.items():
            held = [n for n in names if n in holder.copies]
            if len(held) > 1:
                raise ValueError(
                    f"Adapters {held} each train their own copy of layer "
                    f"{path!r}; only one of them can be active at a time (as "
                    "in PEFT's modules_to_save). Received: "
                    f"adapter_name={names!r}"
                )
        for layer in self.adapter_layers():
            layer.set_active_adapter(names)

    def adapter_layers(self):
        """Every layer holding adapters: the wrappers, then the layers
        trained in full (`AdapterLayer`s), in the order they were added."""
        return [*self.wrappers.values(), *self.copies.values()]

    @property
    def active(self):
        """The names of the active adapters, as the adapted layers hold them
        (each layer those of them it holds)."""
        names = [n for w in self.wrappers.values() for n in w.active_names]
        return list(dict.fromkeys(names))

    def layers_of(self, name):
        """`{path: wrapper}` of the layers adapter `name` (a name or a list of
        names) adapts (`None` or none: {})."""
        return {
            path: self.wrappers[path]
            for n in as_names(name)
            for path in self.adapters[n].paths
        }

    def trained_in_full(self, name):
        """`{path: layer}` adapter `name` trains in full: its own copies (the
        shared layers of a model saved before copies)."""
        paths = self.adapters[name].trainable_paths
        if self.in_place:
            return layers_at(self.model, paths)
        return {path: self.copies[path].copies[name] for path in paths}

    def trainable_ids(self):
        """Ids of the variables that may train: the active adapters' vectors
        and copies of layers trained in full, unless disabled."""
        ids = self._trained_in_full_ids(self.active)
        for wrapper in self.layers_of(self.active).values():
            if wrapper.adapter_enabled:
                for name in self.active:
                    if name in wrapper.adapter_vectors:
                        ids.update(id(w) for w in wrapper.adapter_vectors[name].weights)
        return ids

    def _trained_in_full_ids(self, names):
        if self.in_place:
            layers = layers_at(self.model, self.trainable_paths).values()
            return {id(w) for layer in layers for w in layer.weights}
        return {
            id(w)
            for holder in self.copies.values()
            if holder.adapter_enabled
            for name in names
            if name in holder.copies
            for w in holder.copies[name].weights
        }

    def freeze(self):
        """Freezes everything but adapter vectors and `trainable_layers`.

        Layers with nothing trainable inside are set `trainable=False` (so
        that, for example, BatchNormalization runs in inference mode); layers
        holding adapters keep `trainable=True` with their own weights
        frozen. Called again, it puts back what a `trainable` toggle thawed.
        """
        keep = self._trained_in_full_ids(list(self.adapters))
        keep.update(
            id(w)
            for holder in self.copies.values()
            for copy in holder.copies.values()
            for w in copy.weights
        )
        keep.update(
            id(w)
            for wrapper in self.wrappers.values()
            for vectors in wrapper.adapter_vectors.values()
            for w in vectors.weights
        )
        recorded = {id(item) for item, _ in self.frozen}
        for _, layer in layer_walk.iter_layers(self.model):
            if isinstance(layer, AdapterLayer):
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
        trainable flags are back in place. A layer trained in full gets the
        weights of the active adapter's copy (as PEFT's `unload` keeps it)."""
        self._unwrap(self.wrappers)
        self._unwrap_copies(self.copies, keep_trained=True)
        for item, was_trainable in reversed(self.frozen):
            item.trainable = was_trainable
        self.frozen = []
        self.adapters = {}

    def _unwrap_copies(self, holders, keep_trained):
        if not holders:
            return
        for holder in holders.values():
            if keep_trained and holder.current_layer() is not holder.original_layer:
                for target, source in zip(
                    holder.original_layer.weights,
                    holder.current_layer().weights,
                    strict=True,
                ):
                    target.assign(source)
        model_surgery.replace_layers(
            self.model, {h: h.original_layer for h in holders.values()}
        )
        for path, holder in list(holders.items()):
            original = holder.original_layer
            original.trainable = self.base_trainable.pop(id(original), True)
            self.copies.pop(path, None)

    def _unwrap(self, wrappers):
        if not wrappers:
            return
        model_surgery.replace_layers(
            self.model, {w: w.base_layer for w in wrappers.values()}
        )
        for path, wrapper in list(wrappers.items()):
            base = wrapper.base_layer
            if hasattr(base, "activation"):
                base.activation = wrapper.activation or keras.activations.linear
            base.trainable = self.base_trainable.pop(id(base), True)
            self.wrappers.pop(path, None)


def _noise_seeds(config, targets, fused):
    """`{path: seed}` of each target's noise stream; a fused group's layers
    draw the same noise: its first layer's seed."""
    noise = config.seed if config.generator_seed is None else config.generator_seed
    seeds = {path: derive_seed(noise, i) for i, path in enumerate(targets)}
    for path, (_, group) in fused.items():
        seeds[path] = seeds[group[0]]
    return seeds


def _join_fused_groups(name, fused, wrappers):
    """Makes adapter `name`'s fused groups share one latent: each layer
    joins its group's first."""
    for path, (offset, group) in fused.items():
        first = None if path == group[0] else wrappers[group[0]]
        join_fused_group(wrappers[path], name, offset, first)


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
