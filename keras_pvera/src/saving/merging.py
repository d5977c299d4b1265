"""`merge`: fold the mean adapter into the base kernels, for deployment.

With sampling off, PVeRA's adapter is linear in the layer's input, so it can
be added to the frozen kernel once:

    W_merged = W + A[:r, :in].T @ diag(lambda_d[:r]) @ B[:out, :].T
                   @ diag(alpha * lambda_b)

`merge` rebuilds the base model from the configuration it had before
adaptation (so no keras_pvera class is inside and activations are the
original ones), copies into it every weight of the adapted model and the
assets of layers that keep state beside their weights (a KerasHub
tokenizer's vocabulary, which `.keras` files store as assets too), and adds
each layer's delta of the active adapters (`PVeRADense.merge_delta`, the
one place merging reads it) to its kernel; a layer trained
in full gets the weights of the active adapter's copy. The result has the
base model's architecture, so it runs as fast as the base model and saves
and loads as `.keras` without keras_pvera.

A model adapted on a quantized base (`base.quantize("int8" | "int4" |
"float8" | "gptq" | "awq")` before `apply`) is not merged: the adapter's
delta is mostly smaller than a quantized kernel's rounding step, and
Keras keeps no float kernel to add it to. `merge` refuses and says what
works: load the adapter file onto the float base model and merge that
(quantize the merged model again if wanted).
"""

import tempfile

from keras import ops

from keras_pvera.src.layers.adapter_layer import AdapterLayer
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.layers.trained_copies import TrainedCopies
from keras_pvera.src.models.adapter_lifecycle import adapter_deltas
from keras_pvera.src.models.pvera_model import PVeRAModel
from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.utils import keras_internals


def merge(model, safe_merge=True):
    """Returns a plain Keras model with the active mean adapters folded in.

    PEFT's `merge_and_unload`, leaving the adapted model as it is. The
    predictions of the merged model equal the adapted model's mean
    predictions (sampling off). The adapted model is not changed.

    Args:
        model: A `PVeRAModel` (what `keras_pvera.apply` returns).
        safe_merge: Whether to check every folded kernel for NaN and
            infinity first, and refuse (naming the layers) if any has them.
            On by default (PEFT's default is off): the check costs one
            reduction per layer, and a NaN model is never wanted.

    Returns:
        A new Keras model of the base model's architecture, holding no
        keras_pvera layers, with the adapters added to the kernels.

    Raises:
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: If the base model could not be serialized, if an adapted
            layer is quantized (the message gives the float-base route), if
            the rebuilt model's layers do not line up with the adapted
            model's, or (with `safe_merge`, the default)
            if a merged kernel would hold NaN or infinity.

    Example:

    >>> import keras, numpy as np
    >>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
    ...                          keras.layers.Dense(3)])
    >>> import keras_pvera
    >>> adapted = keras_pvera.apply(base, rank=4)
    >>> for layer in adapted.adapted_layers.values():
    ...     _ = layer.lambda_b.assign(np.ones(layer.out_dim))
    >>> merged = merge(adapted)
    >>> x = np.ones((2, 8), "float32")
    >>> bool(np.allclose(merged.predict(x, verbose=0),
    ...                  adapted.predict(x, verbose=0), atol=1e-5))
    True
    """
    if not isinstance(model, PVeRAModel):
        raise TypeError(
            "merge expects a PVeRAModel (what keras_pvera.apply returns). "
            f"Received: {model!r} of type {type(model).__name__}"
        )
    config = model.base_model_config
    if "error" in config:
        raise ValueError(
            "The base model could not be serialized when it was adapted, so "
            f"it cannot be rebuilt: {config['error']}. Give the base model a "
            "complete `get_config`."
        )
    deltas = adapter_deltas(model, safe_merge)
    merged = keras_internals.deserialize_model(config)
    if not merged.built:
        raise ValueError(
            f"The rebuilt base model {merged.name!r} is not built, so its "
            "weights cannot be set. Give the base model a `build_config`."
        )
    assigned = set()
    for path, adapted, plain in _paired_layers(model.base_model, merged):
        if isinstance(adapted, PVeRADense):
            _copy_own_weights(path, adapted.base_layer, plain, assigned)
            if id(adapted) in deltas:
                kernel = keras_internals.kernel_variable(plain)
                base_kernel = keras_internals.kernel_variable(adapted.base_layer)
                delta = ops.cast(deltas[id(adapted)], kernel.dtype)
                kernel.assign(ops.add(base_kernel, delta))
        elif isinstance(adapted, TrainedCopies):
            # The active adapter's copy, sublayers and all.
            _copy_weights(
                path, adapted.current_layer().weights, plain.weights, assigned
            )
        else:
            _copy_own_weights(path, adapted, plain, assigned)
            _copy_assets(adapted, plain)
    unset = [w.path for w in merged.weights if id(w) not in assigned]
    if unset:
        raise ValueError(
            f"merge could not match weight {unset[0]!r} of the rebuilt base "
            "model to a weight of the adapted model."
        )
    return merged


def _paired_layers(adapted_root, plain_root):
    """Walks two models of one architecture together.

    Yields `(path, adapted_layer, plain_layer)`, the root first. Children that
    hold state (weights, or assets below them) are paired by position (the
    adapted model holds each `PVeRADense` where the base layer was), so
    layers with generated names still pair up. Other children are left out
    on both sides: the rebuilt model's configuration already gives them all
    they hold, and a layer may create them on first use (a KerasHub
    preprocessor builds its packer when it first runs), which the rebuilt
    model has not done. The walk does not enter a `PVeRADense`.
    """
    seen = set()

    def children(layer):
        return [
            c
            for _, c in layer_walk.children(layer)
            if id(c) not in seen and _holds_state(c)
        ]

    def visit(adapted, plain, path):
        yield path, adapted, plain
        if isinstance(adapted, AdapterLayer):
            return
        adapted_children, plain_children = children(adapted), children(plain)
        if len(adapted_children) != len(plain_children):
            raise ValueError(
                f"Layer {path or adapted.name!r} has {len(adapted_children)} "
                "sublayers holding weights or assets in the adapted model but "
                f"{len(plain_children)} in the model rebuilt from its "
                "configuration."
            )
        for a, p in zip(adapted_children, plain_children, strict=False):
            seen.update((id(a), id(p)))
            expected = a.wrapped_layer() if isinstance(a, AdapterLayer) else a
            if type(expected) is not type(p):
                raise ValueError(
                    f"Sublayer {a.name!r} of {path or adapted.name!r} is a "
                    f"{type(expected).__name__} in the adapted model but a "
                    f"{type(p).__name__} in the rebuilt one."
                )
            child_path = f"{path}/{a.name}" if path else a.name
            yield from visit(a, p, child_path)

    seen.update((id(adapted_root), id(plain_root)))
    yield from visit(adapted_root, plain_root, "")


def _has_assets(layer):
    # Keras' saving stores what a layer's `save_assets` writes (a tokenizer's
    # vocabulary) beside the weights.
    return hasattr(layer, "save_assets") and hasattr(layer, "load_assets")


def _holds_state(layer):
    """Whether a layer holds weights or assets (itself or below it)."""
    if layer.weights or _has_assets(layer):
        return True
    return any(_has_assets(child) for _, child in layer_walk.iter_layers(layer))


def _copy_assets(source, target):
    if not _has_assets(source):
        return
    with tempfile.TemporaryDirectory() as directory:
        source.save_assets(directory)
        target.load_assets(directory)


def _own_weights(layer):
    inner = {id(w) for _, child in layer_walk.children(layer) for w in child.weights}
    return [w for w in layer.weights if id(w) not in inner]


def _copy_own_weights(path, source, target, assigned):
    _copy_weights(path, _own_weights(source), _own_weights(target), assigned)


def _copy_weights(path, source_weights, target_weights, assigned):
    if len(source_weights) != len(target_weights):
        raise ValueError(
            f"Layer {path!r} has {len(source_weights)} weights "
            f"in the adapted model but {len(target_weights)} in the rebuilt "
            "one."
        )
    for s, t in zip(source_weights, target_weights, strict=False):
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(
                f"Weight {t.path!r} has shape {tuple(t.shape)} in the rebuilt "
                f"model but {tuple(s.shape)} in the adapted one."
            )
        # A copy: on JAX, sharing one buffer between two models lets a
        # compiled call of one (which donates its buffers) delete the other's.
        t.assign(ops.convert_to_numpy(s))
        assigned.add(id(t))
