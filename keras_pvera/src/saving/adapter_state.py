"""A PVeRA adapter apart from any file format: collect, check, restore.

An `AdapterState` is everything PVeRA adds to a model: the `apply` settings,
the adapted layers with their sizes, their `lambda_d` / `lambda_b` vectors,
the shared projections `A` / `B` (or none, when they are regenerated from the
seed), and the weights of layers trained in full beside the adapters
(`trainable_layers`). Files in keras_pvera's own format and PEFT's are both
read into and written from this one structure.

`restore_adapter` puts a state onto a model: it adapts a base model with the
stored settings, or checks that an adapted model matches. Every check runs
before anything changes, so a mismatch leaves the model as it was.
"""

import dataclasses

import keras
import numpy as np

from keras_pvera.src.layers.linear_map import LINEAR_LAYERS
from keras_pvera.src.layers.linear_map import linear_equation_of
from keras_pvera.src.layers.linear_map import unsupported_reason
from keras_pvera.src.layers.projections import generate_projections
from keras_pvera.src.layers.pvera_config import PVeRAConfig
from keras_pvera.src.layers.pvera_config import projection_out_max
from keras_pvera.src.models.pvera_model import PVeRAModel
from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.surgery.layer_selection import layer_addresses
from keras_pvera.src.surgery.layer_selection import resolve_paths


@dataclasses.dataclass
class AdapterState:
    """Everything PVeRA adds to a model, as NumPy arrays.

    Args:
        config: The adapter's `PVeRAConfig` (no `target` or
            `trainable_layers`: `layers` and `trainable` say which).
        layers: A dict from adapted layer path to `(in_dim, out_dim)`, in
            model order.
        lambda_d: A dict from adapted layer path to its `lambda_d`,
            shape `(2 * rank,)`.
        lambda_b: A dict from adapted layer path to its `lambda_b`,
            shape `(out_dim,)`.
        projections: The shared `(A, B)`, or `None` when they are to be
            regenerated from `config.seed`.
        trainable: A dict from the path of a layer trained in full to the
            list of its weights (`layer.weights` order).
        addresses: A dict from each path of `layers` and `trainable` to its
            `[address, class name]` (`adapter_registry.layer_addresses`), which
            finds the layer in a model whose layer names differ; empty for
            files written before addresses.
    """

    config: PVeRAConfig
    layers: dict
    lambda_d: dict
    lambda_b: dict
    projections: tuple = None
    trainable: dict = dataclasses.field(default_factory=dict)
    addresses: dict = dataclasses.field(default_factory=dict)

    @property
    def rank(self):
        return self.config.rank

    def projection_shapes(self):
        """The shapes `A` and `B` have for these layers.

        Returns:
            A tuple `((2 * rank, in_max), (out_max, rank))`.
        """
        in_max = max(in_dim for in_dim, _ in self.layers.values())
        out_max = projection_out_max(
            self.config.fused_groups, {p: out for p, (_, out) in self.layers.items()}
        )
        return (2 * self.rank, in_max), (out_max, self.rank)

    def seed_projections(self):
        """The projections that `config.seed` generates for these layers."""
        (_, in_max), (out_max, _) = self.projection_shapes()
        return generate_projections(self.config.seed, self.rank, in_max, out_max)

    def require_seed_made(self, projections, because, remedy, seed_made=None):
        """Raises unless `projections` are the ones this adapter's seed makes.

        Projections that are not saved are made again from the seed, so any
        others would come back wrong.

        Args:
            projections: The `(A, B)` arrays to check.
            because: Why they must be seed-made (the error's first words).
            remedy: What the user can do instead.
            seed_made: The pair to compare with; `None` for the one Keras
                generates (`seed_projections()`). PEFT files pass torch's.

        Raises:
            ValueError: If they differ.
        """
        if seed_made is None:
            seed_made = self.seed_projections()
        if not same_arrays(projections, seed_made):
            raise ValueError(
                f"{because}, so the projections must be the ones seed "
                f"{self.config.seed} generates, but these are others (loaded "
                f"from a file). {remedy}"
            )


def check_adapter_state(state):
    """Checks that a state is complete and consistent in itself.

    Args:
        state: An `AdapterState`.

    Raises:
        ValueError: Naming the first bad setting, missing vector or wrong
            shape.
    """
    if not isinstance(state.config, PVeRAConfig):
        raise ValueError(
            f"The adapter's settings are not a PVeRAConfig: {state.config!r}"
        )
    if not state.layers:
        raise ValueError("The adapter adapts no layer.")
    for path, (_, out_dim) in state.layers.items():
        for name, vectors, shape in (
            ("lambda_d", state.lambda_d, (2 * state.rank,)),
            ("lambda_b", state.lambda_b, (out_dim,)),
        ):
            if path not in vectors:
                raise ValueError(f"The adapter has no `{name}` for layer {path!r}.")
            if tuple(vectors[path].shape) != shape:
                raise ValueError(
                    f"The adapter's `{name}` of layer {path!r} has shape "
                    f"{tuple(vectors[path].shape)}; rank {state.rank} and "
                    f"{out_dim} outputs need {shape}."
                )
    for group in state.config.fused_groups or ():
        missing = [path for path in group if path not in state.layers]
        if missing:
            raise ValueError(
                f"The adapter's fused group {list(group)} names layer "
                f"{missing[0]!r}, which it does not adapt."
            )
        for path in group[1:]:
            if not np.array_equal(state.lambda_d[path], state.lambda_d[group[0]]):
                raise ValueError(
                    f"The layers of fused group {list(group)} share one "
                    f"`lambda_d`, but the adapter's differs between "
                    f"{group[0]!r} and {path!r}."
                )
    if state.projections is not None:
        for name, array, shape in zip(
            ("A", "B"), state.projections, state.projection_shapes(), strict=False
        ):
            if tuple(array.shape) != shape:
                raise ValueError(
                    f"The adapter's projection {name} has shape "
                    f"{tuple(array.shape)}; its layers need {shape}."
                )


def check_uncalibrated(model, files):
    """Refuses a model with a calibration temperature, for a file format
    that cannot hold one.

    Args:
        model: A `PVeRAModel`.
        files: The files, for the message (`"PEFT adapter files"`).

    Raises:
        ValueError: If `model.calibration` is set.
    """
    if getattr(model, "calibration", None) is not None:
        raise ValueError(
            "This model carries a calibration temperature (keras_pvera."
            "calibrate), which is beyond the paper and has no place in "
            f"{files}, so what loads them would predict otherwise. Save it "
            "as .keras, or set `model.calibration = None` first to write "
            "the uncalibrated adapter."
        )


def adapter_state_of(model, adapter=None):
    """Collects one adapter of an adapted model.

    Args:
        model: A `PVeRAModel` (what `keras_pvera.apply` returns).
        adapter: The adapter's name; `None` for the active one.

    Returns:
        An `AdapterState` holding copies of the model's vectors and
        projections (always included here; writers may leave them out).

    Raises:
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: If the model has no such adapter.

    Example:

    >>> import keras, keras_pvera
    >>> base = keras.Sequential([keras.Input((8,)),
    ...                          keras.layers.Dense(16, name="dense"),
    ...                          keras.layers.Dense(3, name="head")])
    >>> state = adapter_state_of(
    ...     keras_pvera.apply(base, rank=4, target=["dense"]))
    >>> list(state.layers)
    ['dense']
    """
    name = getattr(model, "active_adapter", None) if adapter is None else adapter
    _check_adapter_loaded(model, name)
    record = model.adapter_registry.adapters[name]
    config = record.config
    wrappers = model.adapter_registry.layers_of(name)
    in_full = model.adapter_registry.trained_in_full(name)
    registry = model.projection_registry
    return AdapterState(
        config=config.replace(target=None, trainable_layers=None),
        layers={
            path: (layer.in_dim, layer.out_dim) for path, layer in wrappers.items()
        },
        lambda_d={
            path: _to_numpy(layer.adapter_vectors[name].lambda_d)
            for path, layer in wrappers.items()
        },
        lambda_b={
            path: _to_numpy(layer.adapter_vectors[name].lambda_b)
            for path, layer in wrappers.items()
        },
        projections=(
            _to_numpy(registry.projection_a),
            _to_numpy(registry.projection_b),
        ),
        trainable={
            path: [_to_numpy(w) for w in layer.weights]
            for path, layer in in_full.items()
        },
        addresses=layer_addresses(model.base_model, list(wrappers) + list(in_full)),
    )


def restore_adapter(model, state, adapter=None):
    """Puts an adapter onto a model.

    On a base model, applies PVeRA with the state's settings to the state's
    layers. On an adapted model, checks that the named adapter matches, or
    adds it as a new adapter when the model has none of that name. Then sets
    every vector, the projections (when the state has them) and the weights
    of the layers trained in full.

    Args:
        model: A base Keras model, or a `PVeRAModel`.
        state: An `AdapterState`.
        adapter: The adapter's name; `None`: `"default"` on a base model,
            the active adapter on an adapted one.

    Returns:
        The adapted `PVeRAModel` (`model` itself if it was one).

    Raises:
        ValueError: Naming the first mismatch between the state and the
            model; the model is then unchanged.
    """
    check_adapter_state(state)
    state = _located(
        model.base_model if isinstance(model, PVeRAModel) else model, state
    )
    paths, trainable = list(state.layers), list(state.trainable)
    if not isinstance(model, PVeRAModel):
        _check_base_model(model, state)
        name = "default" if adapter is None else adapter
        target = PVeRAModel(
            model,
            state.config,
            adapter_name=name,
            adapted_paths=paths,
            trainable_paths=trainable,
        )
        _assign(target, state, name)
        return target
    name = model.active_adapter if adapter is None else adapter
    if name in model.adapter_names:
        _check_adapted_model(model, state, name)
        _assign(model, state, name)
        return model
    if _other_projections(model, state):
        raise ValueError(
            f"Adapter {name!r} was saved with other projections than this "
            "model's, which all its adapters share. Load it onto the base "
            "model instead, or into an adapter of the same name."
        )
    model.add_adapter(
        name, state.config, adapted_paths=paths, trainable_paths=trainable
    )
    _assign(model, state, name)
    return model


def hotswap_state(model, state, adapter_name):
    """Sets a loaded adapter's values from a state that matches it, in place.

    Only variables are assigned, so compiled functions (`predict`, a
    KerasHub task's `generate`) keep running and see the new values. The
    state must match the loaded adapter in everything its compiled functions
    were traced with: its adapted layers and their sizes, rank, seed, alpha,
    fused groups, layers trained in full and projections.

    Args:
        model: A `PVeRAModel`.
        state: An `AdapterState`.
        adapter_name: The name of one of the model's adapters.

    Raises:
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: For a name the model has no adapter of, an adapter
            merged into the kernels, or the first mismatch between the state
            and the adapter; nothing is assigned then.
    """
    check_adapter_state(state)
    _check_adapter_loaded(
        model, adapter_name, hint=" Load the file with keras_pvera.load_adapter first."
    )
    if adapter_name in model.merged_adapters:
        raise ValueError(
            f"Adapter {adapter_name!r} is merged into the base kernels, so new "
            "values would not reach the outputs. Call "
            "`model.unmerge_adapter()` first."
        )
    state = _located(model.base_model, state)
    _check_adapted_model(model, state, adapter_name)
    if _other_projections(model, state):
        raise ValueError(
            "The adapter's projections differ from the model's, which "
            f"adapter {adapter_name!r} runs with; a hot-swap sets only the "
            "vectors and the layers trained in full."
        )
    _assign(model, state, adapter_name)


def _check_adapter_loaded(model, name, hint=""):
    """Raises unless `model` is a `PVeRAModel` with an adapter named `name`."""
    if not isinstance(model, PVeRAModel):
        raise TypeError(
            "Expected a PVeRAModel (what keras_pvera.apply or "
            f"keras_pvera.load_adapter returns). Received: {model!r} of type "
            f"{type(model).__name__}"
        )
    if name not in model.adapter_names:
        raise ValueError(
            f"The model has no adapter named {name!r}. Its adapters: "
            f"{model.adapter_names}.{hint}"
        )


def _other_projections(model, state):
    """Whether `state` holds projections other than the model's."""
    return state.projections is not None and not same_arrays(
        state.projections, _projections_of(model)
    )


def _located(model, state):
    """The state with its layers under the paths `model` gives them.

    Paths are found by name, else by address (a model built again, under
    another name or in another process). When neither finds them, the state
    is returned as it is, and the checks that follow name the first layer
    the model lacks.
    """
    if not isinstance(model, keras.Model):
        return state
    try:
        where = resolve_paths(
            model, list(state.layers) + list(state.trainable), state.addresses
        )
    except ValueError:
        return state
    if all(old == new for old, new in where.items()):
        return state
    groups = state.config.fused_groups
    if groups is not None:
        groups = [[where[p] for p in group] for group in groups]
    return dataclasses.replace(
        state,
        config=state.config.replace(fused_groups=groups),
        layers={where[p]: sizes for p, sizes in state.layers.items()},
        lambda_d={where[p]: v for p, v in state.lambda_d.items()},
        lambda_b={where[p]: v for p, v in state.lambda_b.items()},
        trainable={where[p]: w for p, w in state.trainable.items()},
        addresses={where[p]: a for p, a in state.addresses.items()},
    )


def _projections_of(model):
    registry = model.projection_registry
    return _to_numpy(registry.projection_a), _to_numpy(registry.projection_b)


def _check_adapted_model(model, state, name):
    config = model.adapter_registry.adapters[name].config
    for setting in ("rank", "seed", "alpha"):
        if getattr(config, setting) != getattr(state.config, setting):
            raise ValueError(
                f"The adapter's {setting}={getattr(state.config, setting)!r} "
                f"differs from the model's {setting}={getattr(config, setting)!r} "
                f"(adapter {name!r})."
            )
    if config.fused_groups != state.config.fused_groups:
        raise ValueError(
            f"The adapter's fused groups {state.config.fused_groups!r} differ "
            f"from the model's {config.fused_groups!r} (adapter {name!r}): a "
            "fused group computes one latent, separate layers one each. "
            "Load the adapter onto the base model instead."
        )
    wrappers = model.adapter_registry.layers_of(name)
    _check_same_paths("adapted layer", list(state.layers), list(wrappers))
    for path, layer in wrappers.items():
        if state.layers[path] != (layer.in_dim, layer.out_dim):
            raise ValueError(_size_mismatch(path, state.layers[path], layer))
    in_full = model.adapter_registry.trained_in_full(name)
    _check_same_paths("layer trained in full", list(state.trainable), list(in_full))
    for path, weights in state.trainable.items():
        _check_weights(path, weights, in_full[path])
    registry = model.projection_registry
    shapes = (
        tuple(registry.projection_a.shape),
        tuple(registry.projection_b.shape),
    )
    if shapes != state.projection_shapes():
        raise ValueError(
            f"The model's projections have shapes {shapes}; the adapter's "
            f"layers need {state.projection_shapes()}."
        )
    if state.projections is None:
        state.require_seed_made(
            _projections_of(model),
            "The adapter holds no projections",
            "Load the adapter onto the base model instead.",
        )
    elif len(model.adapter_names) > 1 and not same_arrays(
        state.projections, _projections_of(model)
    ):
        raise ValueError(
            "The adapter's projections differ from the model's, which its "
            f"other adapters {model.adapter_names} share. Load it onto the "
            "base model instead."
        )
    _check_saveable(state, registry.save_projection)


def _check_base_model(model, state):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected a Keras model. Received: "
            f"{model!r} of type {type(model).__name__}"
        )
    if layer_walk.pvera_layers(model):
        raise ValueError(
            f"Model {model.name!r} holds PVeRA layers but is not a "
            "PVeRAModel. Pass the model that keras_pvera.apply returned, or "
            "the base model before adaptation."
        )
    layers = dict(layer_walk.iter_layers(model))
    for path, sizes in state.layers.items():
        if path not in layers:
            raise ValueError(
                f"The adapter adapts layer {path!r}, which model "
                f"{model.name!r} does not have. Its Dense/EinsumDense "
                f"layers: {_linear_paths(layers)[:20]}"
            )
        layer = layers[path]
        if unsupported_reason(layer) is not None:
            raise ValueError(
                f"The adapter adapts layer {path!r}, but in model "
                f"{model.name!r} that layer is a {type(layer).__name__}, "
                "which PVeRA does not adapt."
            )
        if not layer.built:
            raise ValueError(
                f"Layer {path!r} is not built. Build the model first: call "
                "it on a batch of data or call `model.build(input_shape)`."
            )
        linear = linear_equation_of(layer)
        if sizes != (linear.in_dim, linear.out_dim):
            raise ValueError(_size_mismatch(path, sizes, linear))
    for path, weights in state.trainable.items():
        if path not in layers:
            raise ValueError(
                f"The adapter trains layer {path!r} in full, but model "
                f"{model.name!r} has no such layer."
            )
        _check_weights(path, weights, layers[path])
    _check_saveable(state, state.config.save_projection)


def _check_saveable(state, save_projection):
    # A model that saves no projections makes them again from the seed.
    if state.projections is not None and not save_projection:
        state.require_seed_made(
            state.projections,
            "The model saves no projections (save_projection=False)",
            "Adapt the base model with save_projection=True.",
        )


def _check_same_paths(what, expected, actual):
    for path in expected:
        if path not in actual:
            raise ValueError(
                f"The adapter has {what} {path!r}, which is not one of the "
                f"model's: {actual[:20]}"
            )
    for path in actual:
        if path not in expected:
            raise ValueError(
                f"The model has {what} {path!r}, which the adapter lacks. "
                f"The adapter's: {expected[:20]}"
            )


def _check_weights(path, arrays, layer):
    weights = layer.weights
    if len(arrays) != len(weights):
        raise ValueError(
            f"The adapter has {len(arrays)} weights for layer {path!r}, "
            f"which has {len(weights)}."
        )
    for array, weight in zip(arrays, weights, strict=False):
        if tuple(array.shape) != tuple(weight.shape):
            raise ValueError(
                f"The adapter's weight {weight.name!r} of layer {path!r} has "
                f"shape {tuple(array.shape)}; the layer's has "
                f"{tuple(weight.shape)}."
            )


def _size_mismatch(path, sizes, linear):
    return (
        f"Layer {path!r} is {sizes[0]} -> {sizes[1]} in the adapter but "
        f"{linear.in_dim} -> {linear.out_dim} in the model."
    )


def _linear_paths(layers):
    return [p for p, layer in layers.items() if isinstance(layer, LINEAR_LAYERS)]


def _assign(model, state, name):
    for path, layer in model.adapter_registry.layers_of(name).items():
        vectors = layer.adapter_vectors[name]
        _set(vectors.lambda_d, state.lambda_d[path])
        _set(vectors.lambda_b, state.lambda_b[path])
    if state.projections is not None:
        registry = model.projection_registry
        _set(registry.projection_a, state.projections[0])
        _set(registry.projection_b, state.projections[1])
    in_full = model.adapter_registry.trained_in_full(name)
    for path, arrays in state.trainable.items():
        for weight, array in zip(in_full[path].weights, arrays, strict=False):
            _set(weight, array)


def _set(variable, array):
    variable.assign(np.asarray(array, dtype=variable.dtype))


def _to_numpy(variable):
    return np.array(keras.ops.convert_to_numpy(variable))


def same_arrays(first, second):
    """Whether two sequences of arrays are equal element by element."""
    return all(np.array_equal(a, b) for a, b in zip(first, second, strict=False))
