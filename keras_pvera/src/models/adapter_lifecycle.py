"""The adapter lifecycle of a `PVeRAModel`, as PEFT has it.

Several named adapters on one model (one active at a time: only its
vectors run and train), the base model back (`disable_adapter`, `unload`),
and merging in place (`merge_adapter`, `unmerge_adapter`). Also what keeps
the base frozen whatever `trainable` toggles a user makes. The structural
work is `adapter_registry.AdapterRegistry`'s; this is the model's public face of it.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_pvera.src.layers.pvera_config import PVeRAConfig
from keras_pvera.src.utils import keras_internals


class AdapterLifecycle:
    """Mixed into `PVeRAModel`: named adapters, disable, unload, merge.

    Example:

    >>> import numpy as np, keras_pvera
    >>> base = keras.Sequential([keras.Input((4,)),
    ...                          keras.layers.Dense(8, name="hidden"),
    ...                          keras.layers.Dense(2, name="head")])
    >>> model = keras_pvera.apply(base, rank=2)
    >>> model.add_adapter("other", rank=2, d_initial=0.5)
    >>> model.set_adapter("other")
    >>> model.adapter_names, model.active_adapter
    (['default', 'other'], 'other')
    >>> with model.disable_adapter():
    ...     pass  # The model computes the base model's outputs here.
    >>> model.unload() is base
    True
    """

    @property
    def adapter_names(self):
        """The names of the model's adapters, in the order they were added."""
        return list(self.adapter_registry.adapters)

    @property
    def active_adapter(self):
        """The name of the adapter that runs and trains, or `None`."""
        return self.adapter_registry.active

    @property
    def pvera_config(self):
        """The active adapter's `PVeRAConfig`."""
        if self.active_adapter is None:
            raise ValueError(
                "The model has no active adapter. Call `model.set_adapter(name)` "
                f"with one of {self.adapter_names}."
            )
        return self.adapter_registry.adapters[self.active_adapter].config

    @property
    def trainable_paths(self):
        """Paths of the layers trained in full beside the adapters."""
        return list(self.adapter_registry.trainable_paths)

    @property
    def adapted_layers(self):
        """`{path: PVeRADense}` of the layers the active adapter adapts."""
        return self.adapter_registry.layers_of(self.active_adapter)

    def add_adapter(self, adapter_name, config=None, **settings):
        """Adds a named adapter (PEFT's `add_adapter`); it is not made active.

        Every adapter shares the model's projections, so it needs the first
        adapter's `seed`, `rank` and `save_projection`, and layers no larger
        than the first adapter's; `trainable_layers` are shared by all.

        Args:
            adapter_name: A new name.
            config: A `PVeRAConfig`, or settings by name in `**settings`.
            **settings: `PVeRAConfig` settings (`adapted_paths` and
                `trainable_paths` also accepted, as when loading).

        Raises:
            ValueError: For a name in use, a bad setting, or settings that do
                not fit the shared projections (the message says which).
        """
        paths = settings.pop("adapted_paths", None)
        trainable = settings.pop("trainable_paths", None)
        self._check_not_merged("add an adapter")
        config = PVeRAConfig.from_settings(config, **settings)
        self.adapter_registry.add(adapter_name, config, paths, trainable)
        self.adapter_registry.set_active(self.active_adapter)
        self._track_kl(config)
        self._changed()

    def set_adapter(self, adapter_name):
        """Makes `adapter_name` the one adapter that runs and trains.

        A compiled model gets a fresh optimizer of the same configuration: a
        Keras optimizer serves the one set of variables it was built for.
        """
        self._check_adapter(adapter_name)
        self._check_not_merged("switch adapters")
        if adapter_name != self.active_adapter:
            self.adapter_registry.set_active(adapter_name)
            self._renew_optimizer()
        self._changed()

    def _renew_optimizer(self):
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and optimizer.built:
            with keras_internals.unlocked(self):
                self.optimizer = optimizer.__class__.from_config(optimizer.get_config())

    def delete_adapter(self, adapter_name):
        """Deletes an adapter; deleting the active one leaves none active."""
        self._check_adapter(adapter_name)
        if len(self.adapter_names) == 1:
            raise ValueError(
                f"{adapter_name!r} is the model's only adapter. Call "
                "`model.unload()` to get the base model back instead."
            )
        self._check_not_merged("delete an adapter")
        self.adapter_registry.delete(adapter_name)
        self._renew_optimizer()
        self._changed()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this context, the model computes the base model's outputs."""
        wrappers = list(self.adapter_registry.wrappers.values())
        for wrapper in wrappers:
            wrapper.adapter_enabled = False
        self._changed()
        try:
            yield self
        finally:
            for wrapper in wrappers:
                wrapper.adapter_enabled = True
            self._changed()

    def unload(self):
        """Takes every adapter out and returns the base model as it was."""
        self._check_not_merged("unload")
        self.adapter_registry.unload()
        self._changed()
        return self.base_model

    def merge_adapter(self, safe_merge=False):
        """Folds the active adapter's mean into the base kernels, in place.

        Afterwards the adapted layers run their base layers alone, so mean
        predictions are unchanged (within float rounding); training and
        sampling are refused until `unmerge_adapter`.

        Args:
            safe_merge: Whether to refuse (naming the layers) when a merged
                kernel would hold NaN or infinity; nothing changes then.

        Raises:
            ValueError: With no active adapter, for a quantized base layer,
                or (with `safe_merge`) non-finite kernels.

        Example:

        >>> import keras, numpy as np, keras_pvera
        >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                          keras.layers.Dense(2)])
        >>> model = keras_pvera.apply(base, rank=2)
        >>> x = np.ones((1, 4), "float32")
        >>> before = model.predict(x, verbose=0)
        >>> model.merge_adapter(safe_merge=True)
        >>> bool(np.allclose(model.predict(x, verbose=0), before, atol=1e-6))
        True
        >>> model.unmerge_adapter()
        """
        self._check_not_merged("merge again")
        if self.active_adapter is None:
            raise ValueError(
                "The model has no active adapter to merge. Call "
                f"`model.set_adapter(name)` with one of {self.adapter_names}."
            )
        deltas = adapter_deltas(self, safe_merge)
        for layer in self.adapted_layers.values():
            kernel = keras_internals.kernel_variable(layer.base_layer)
            kernel.assign(ops.add(kernel, ops.cast(deltas[id(layer)], kernel.dtype)))
            layer.merged_adapter = self.active_adapter
        self._changed()

    def unmerge_adapter(self):
        """Takes a merged adapter back out of the base kernels.

        Raises:
            ValueError: If no adapter is merged.
        """
        if self.merged_adapter is None:
            raise ValueError("No adapter is merged: there is nothing to unmerge.")
        for layer in self.adapted_layers.values():
            layer.merged_adapter = None
            kernel = keras_internals.kernel_variable(layer.base_layer)
            delta = ops.cast(layer.delta_kernel(), kernel.dtype)
            kernel.assign(ops.subtract(kernel, delta))
        self._changed()

    @property
    def merged_adapter(self):
        """The name of the adapter merged into the kernels, or `None`."""
        return next(
            (w.merged_adapter for w in self.adapter_registry.wrappers.values()), None
        )

    def _check_adapter(self, adapter_name):
        if adapter_name not in self.adapter_registry.adapters:
            raise ValueError(
                f"No adapter named {adapter_name!r}. Adapters: {self.adapter_names}"
            )

    def _check_not_merged(self, action):
        if self.merged_adapter is not None:
            raise ValueError(
                f"Cannot {action} while adapter {self.merged_adapter!r} is "
                "merged into the base kernels. Call `model.unmerge_adapter()`."
            )

    def _changed(self):
        self.allowed_ids = None
        keras_internals.drop_compiled_functions(self)

    @property
    def sample_at_inference(self):
        """Whether inference samples the latent code (Monte Carlo passes).

        Stored in the active adapter's layers; on when any of them samples.
        Setting it sets every one of them.
        """
        return self.pvera_config.sample_at_inference

    @sample_at_inference.setter
    def sample_at_inference(self, value):
        if value:
            self._check_not_merged("sample")
        for layer in self.adapted_layers.values():
            layer.sample_at_inference = bool(value)
        self._changed()

    @property
    def trainable(self):
        return keras.Model.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        keras.Model.trainable.fset(self, value)
        if getattr(self, "adapter_registry", None) is not None:
            self.adapter_registry.freeze()  # Toggling never thaws the base.

    def _allowed(self, variable):
        if getattr(self, "allowed_ids", None) is None:
            self.allowed_ids = self.adapter_registry.trainable_ids()
        return variable.trainable and id(variable) in self.allowed_ids

    # Whatever a `trainable` toggle on an inner layer did, only the active
    # adapter's vectors and `trainable_layers` train.
    trainable_variables = trainable_weights = property(
        lambda self: (
            [v for v in self.weights if self._allowed(v)] if self.trainable else []
        )
    )
    non_trainable_weights = property(
        lambda self: (
            [v for v in self.weights if not self._allowed(v)]
            if self.trainable
            else self.weights
        )
    )
    non_trainable_variables = property(
        lambda self: (
            [v for v in self.variables if not self._allowed(v)]
            if self.trainable
            else self.variables
        )
    )


def adapter_deltas(model, safe_merge):
    """`{id(wrapper): delta_kernel}` of `model`'s active adapter, checked.

    Empty when no adapter is active or one is merged already. Used by
    `merge_adapter` and by `keras_pvera.merge`.

    Raises:
        ValueError: For a quantized base layer, or (with `safe_merge`) a
            kernel that would hold NaN or infinity.
    """
    if model.active_adapter is None or model.merged_adapter is not None:
        return {}
    deltas, bad = {}, []
    for path, layer in model.adapted_layers.items():
        if layer.base_layer.quantization_mode is not None:
            raise ValueError(
                f"Layer {path!r} is quantized "
                f"(mode={layer.base_layer.quantization_mode!r}); merging "
                "folds the adapter into float kernels. Merge before quantizing."
            )
        deltas[id(layer)] = layer.delta_kernel()
        if safe_merge:
            kernel = ops.add(layer.base_layer.kernel, deltas[id(layer)])
            if not np.all(np.isfinite(ops.convert_to_numpy(kernel))):
                bad.append(path)
    if bad:
        raise ValueError(
            f"Merging would put NaN or infinity into the kernels of {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}: their adapter vectors "
            "diverged. Nothing was merged; train again with a lower learning "
            "rate or gradient clipping."
        )
    return deltas
