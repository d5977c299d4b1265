"""`TrainedCopies`: a layer trained in full, one copy per adapter.

PEFT's `ModulesToSaveWrapper` in Keras. A layer trained in full beside the
adapters (`trainable_layers`, PEFT's `modules_to_save`, typically a task
head) keeps its original, frozen, plus one trained copy per adapter that
trains it. The copy of the active adapter runs; the original runs when no
active adapter has a copy, or when the adapters are disabled, so
`disable_adapter()` gives the base model back after training.
"""

import keras
from keras import ops

from keras_pvera.src.layers import row_adapters
from keras_pvera.src.layers.adapter_layer import AdapterLayer
from keras_pvera.src.utils import keras_internals


def copy_layer(layer, name=None):
    """A new layer of `layer`'s configuration, built, with its weights.

    Args:
        layer: A built Keras layer.
        name: The copy's name; `None` keeps `layer`'s.

    Returns:
        The copy.

    Raises:
        ValueError: If `layer` cannot be rebuilt from its configuration
            with the same weights.
    """
    config = layer.get_config()
    if name is not None:
        config["name"] = name
    try:
        clone = layer.__class__.from_config(config)
        build_config = layer.get_build_config()
        if build_config is not None and not clone.built:
            clone.build_from_config(build_config)
    except Exception as e:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) is trained in full, "
            "so each adapter trains a copy of it, but it cannot be rebuilt "
            f"from its configuration ({type(e).__name__}: {e}). Give it a "
            "complete `get_config`, or leave it out of `trainable_layers`."
        ) from None
    if [tuple(w.shape) for w in clone.weights] != [
        tuple(w.shape) for w in layer.weights
    ]:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) rebuilt from its "
            "configuration has other weights than it has, so it cannot be "
            "copied for an adapter to train. Leave it out of `trainable_layers`."
        )
    for target, source in zip(clone.weights, layer.weights, strict=True):
        target.assign(keras.ops.convert_to_numpy(source))
    return clone


_OWN_ATTRIBUTES = ("original_layer", "copies", "active_names", "enabled")


@keras.saving.register_keras_serializable(package="keras_pvera")
class TrainedCopies(AdapterLayer):
    """A layer trained in full: the original plus one copy per adapter.

    The copy of the active adapter runs and trains; the original runs when
    no active adapter has a copy or the adapters are disabled. Attributes
    this layer lacks are read from the layer that runs (`head.kernel`), as
    PEFT's `ModulesToSaveWrapper` does.

    Args:
        original_layer: The built layer to train in full (kept frozen).
        **kwargs: Base layer keyword arguments such as `name`.

    Example:

    >>> import numpy as np
    >>> head = keras.layers.Dense(2)
    >>> head.build((None, 3))
    >>> copies = TrainedCopies(head)
    >>> copies.add_copy("default")
    >>> copies.set_active_adapter("default")
    >>> _ = copies.copies["default"].kernel.assign(np.ones((3, 2)))
    >>> x = np.ones((1, 3), "float32")
    >>> keras.ops.convert_to_numpy(copies(x)).tolist()  # the copy
    [[3.0, 3.0]]
    >>> copies.adapter_enabled = False
    >>> bool(np.array_equal(keras.ops.convert_to_numpy(copies(x)),
    ...                     keras.ops.convert_to_numpy(head(x))))  # the original
    True
    """

    def __init__(self, original_layer, **kwargs):
        kwargs.setdefault("name", original_layer.name)
        kwargs.setdefault("dtype", original_layer.dtype_policy)
        super().__init__(**kwargs)
        self.original_layer = original_layer
        self.copies = {}
        self._apply_trainability()
        self.built = True

    def add_copy(self, adapter_name):
        """Adds `adapter_name`'s copy of the original layer (not active)."""
        if adapter_name in self.copies:
            raise ValueError(
                f"Layer {self.name!r} already has a copy for adapter "
                f"{adapter_name!r}. Copies: {list(self.copies)}"
            )
        with keras_internals.unlocked(self):
            self.copies[adapter_name] = copy_layer(self.original_layer)
        self._apply_trainability()

    def delete_copy(self, adapter_name):
        """Removes `adapter_name`'s copy, if any."""
        if adapter_name in self.copies:
            with keras_internals.unlocked(self):
                self.copies.pop(adapter_name)
        self._forget(adapter_name)

    def _adapters(self):
        return self.copies

    def _trainables_of(self, adapter_name):
        return [self.copies[adapter_name]]

    def _always_frozen(self):
        return [self.original_layer]

    def _check_can_activate(self, held, adapter_name):
        if len(held) > 1:
            raise ValueError(
                f"Layer {self.name!r} is trained in full by adapters "
                f"{list(held)}, each with its own copy; only one of them can "
                "be active at a time (as in PEFT's modules_to_save). "
                f"Received: adapter_name={adapter_name!r}"
            )

    def wrapped_layer(self):
        """The original layer: inputs and masks are checked as it checks them."""
        return self.original_layer

    def current_layer(self):
        """The layer that runs now: the active copy, else the original.

        A method, not a property: Keras' saving walks properties, and would
        file the layer under this name.
        """
        if self.enabled and self.active_names:
            return self.copies[self.active_names[0]]
        return self.original_layer

    def __getattr__(self, name):
        # Only reached for a missing attribute: as PEFT's wrapper does, read
        # it from the layer that runs now (`head.kernel`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in _OWN_ATTRIBUTES:
                raise
            return getattr(self.current_layer(), name)

    def call(self, *args, **kwargs):
        rows = row_adapters.current()
        if rows is None:
            return self.current_layer()(*args, **kwargs)
        # Each row's own copy (`row_adapters`): the original for the base
        # model and for adapters without a copy; each layer runs once.
        outputs, result = {}, None
        for name in rows.names:
            layer = self.copies.get(name, self.original_layer)
            if id(layer) not in outputs:
                outputs[id(layer)] = layer(*args, **kwargs)
            output = outputs[id(layer)]
            if result is None:
                result = output
                continue
            result = keras.tree.map_structure(
                lambda new, old, name=name: ops.where(
                    rows.picks(name, len(new.shape)), new, old
                ),
                output,
                result,
            )
        return result

    def compute_output_shape(self, *args, **kwargs):
        return self.original_layer.compute_output_shape(*args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        return self.current_layer().compute_output_spec(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "original_layer": keras.saving.serialize_keras_object(
                    self.original_layer
                ),
                "adapters": list(self.copies),
                "active_adapter": list(self.active_names),
                "adapter_enabled": self.enabled,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        original = keras.saving.deserialize_keras_object(config.pop("original_layer"))
        adapters = config.pop("adapters", [])
        active = config.pop("active_adapter", [])
        enabled = config.pop("adapter_enabled", True)
        layer = cls(original, **config)
        if adapters and not original.built:
            raise ValueError(
                f"Layer {original.name!r} must be built to hold trained copies."
            )
        for name in adapters:
            layer.add_copy(name)
        layer.set_active_adapter(active)
        layer.adapter_enabled = enabled
        return layer
