"""`merge`: fold the mean adapter into the base kernels, for deployment.

With sampling off, PVeRA's adapter is linear in the layer's input, so it can
be added to the frozen kernel once:

    W_merged = W + A[:r, :in].T @ diag(lambda_d[:r]) @ B[:out, :].T
                   @ diag(alpha * lambda_b)

`merge` rebuilds the base model from the configuration it had before
adaptation (so no keras_pvera class is inside and activations are the
original ones), copies every weight of the adapted model into it, and adds
each adapter's `delta_kernel()` to its layer's kernel. The result has the
base model's architecture, so it runs as fast as the base model and saves
and loads as `.keras` without keras_pvera.
"""

import keras
from keras import ops

from keras_pvera import model_surgery
from keras_pvera.pvera_dense import PVeRADense
from keras_pvera.pvera_model import PVeRAModel


def merge(model):
    """Returns a plain Keras model with the mean adapters folded in.

    The predictions of the merged model equal the adapted model's mean
    predictions (sampling off). The adapted model is not changed.

    Args:
        model: A `PVeRAModel` (what `keras_pvera.apply` returns).

    Returns:
        A new Keras model of the base model's architecture, holding no
        keras_pvera layers, with the adapters added to the kernels.

    Raises:
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: If the base model could not be serialized, if an adapted
            layer is quantized, or if the rebuilt model's layers do not line
            up with the adapted model's.

    Example:

    >>> import numpy as np
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
    for path, layer in model.adapted_layers.items():
        if layer.base_layer.quantization_mode is not None:
            raise ValueError(
                f"Layer {path!r} is quantized "
                f"(mode={layer.base_layer.quantization_mode!r}); merge folds "
                "the adapter into float kernels. Merge before quantizing."
            )
    merged = keras.saving.deserialize_keras_object(_plain_copy(config))
    if not merged.built:
        raise ValueError(
            f"The rebuilt base model {merged.name!r} is not built, so its "
            "weights cannot be set. Give the base model a `build_config`."
        )
    assigned = set()
    for path, adapted, plain in _paired_layers(model.base_model, merged):
        if isinstance(adapted, PVeRADense):
            _copy_own_weights(path, adapted.base_layer, plain, assigned)
            kernel = plain._kernel
            delta = ops.cast(adapted.delta_kernel(), kernel.dtype)
            kernel.assign(ops.add(adapted.base_layer._kernel, delta))
        else:
            _copy_own_weights(path, adapted, plain, assigned)
    unset = [w.path for w in merged.weights if id(w) not in assigned]
    if unset:
        raise ValueError(
            f"merge could not match weight {unset[0]!r} of the rebuilt base "
            "model to a weight of the adapted model."
        )
    return merged


def _plain_copy(value):
    # The stored configuration may be wrapped in Keras' attribute-tracking
    # containers; rebuild it from plain dicts, lists and tuples.
    if isinstance(value, dict):
        return {key: _plain_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain_copy(item) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def _paired_layers(adapted_root, plain_root):
    """Walks two models of one architecture together.

    Yields `(path, adapted_layer, plain_layer)`, the root first. Children are
    paired by position (the adapted model holds each `PVeRADense` where the
    base layer was), so layers with generated names still pair up. The walk
    does not enter a `PVeRADense`.
    """
    seen = set()

    def visit(adapted, plain, path):
        yield path, adapted, plain
        if isinstance(adapted, PVeRADense):
            return
        adapted_children = [
            c for c in model_surgery.child_layers(adapted) if id(c) not in seen
        ]
        plain_children = model_surgery.child_layers(plain)
        plain_children = [c for c in plain_children if id(c) not in seen]
        if len(adapted_children) != len(plain_children):
            raise ValueError(
                f"Layer {path or adapted.name!r} has {len(adapted_children)} "
                f"sublayers in the adapted model but {len(plain_children)} "
                "in the model rebuilt from its configuration."
            )
        for a, p in zip(adapted_children, plain_children, strict=False):
            seen.update((id(a), id(p)))
            expected = a.base_layer if isinstance(a, PVeRADense) else a
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


def _own_weights(layer):
    inner = {
        id(w) for child in model_surgery.child_layers(layer) for w in child.weights
    }
    return [w for w in layer.weights if id(w) not in inner]


def _copy_own_weights(path, source, target, assigned):
    source_weights = _own_weights(source)
    target_weights = _own_weights(target)
    if len(source_weights) != len(target_weights):
        raise ValueError(
            f"Layer {path or source.name!r} has {len(source_weights)} weights "
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
