"""The adapter lifecycle of a `PVeRAModel`, as PEFT has it.

Several named adapters on one model (one active at a time: only its
vectors run and train), the base model back (`disable_adapter`, `unload`),
and merging in place (`merge_adapter`, `unmerge_adapter`). Also what keeps
the base frozen whatever `trainable` toggles a user makes. The structural
work is `injection.Injection`'s; this is the model's public face of it.
"""

import contextlib

import keras

from keras_pvera import keras_internals
from keras_pvera import merging
from keras_pvera.pvera_config import PVeRAConfig


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

    adapter_names = property(lambda self: list(self.injection.adapters))
    active_adapter = property(lambda self: self.injection.active)

    @property
    def pvera_config(self):
        """The active adapter's `PVeRAConfig`."""
        if self.active_adapter is None:
            raise ValueError(
                "The model has no active adapter. Call `model.set_adapter(name)` "
                f"with one of {self.adapter_names}."
            )
        return self.injection.adapters[self.active_adapter].config

    trainable_paths = property(lambda self: list(self.injection.trainable_paths))

    @property
    def adapted_layers(self):
        """`{path: PVeRADense}` of the layers the active adapter adapts."""
        return self.injection.layers_of(self.active_adapter)

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
        self.injection.add(adapter_name, config, paths, trainable)
        self.injection.set_active(self.active_adapter)
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
            self.injection.set_active(adapter_name)
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
        self.injection.delete(adapter_name)
        self._renew_optimizer()
        self._changed()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this context, the model computes the base model's outputs."""
        wrappers = list(self.injection.wrappers.values())
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
        self.injection.unload()
        self._changed()
        return self.base_model

    def merge_adapter(self, safe_merge=False):
        """Folds the active adapter's mean into the base kernels, in place."""
        self._check_not_merged("merge again")
        merging.merge_in_place(self, safe_merge=safe_merge)
        self._changed()

    def unmerge_adapter(self):
        """Takes a merged adapter back out of the base kernels."""
        merging.unmerge_in_place(self)
        self._changed()

    @property
    def merged_adapter(self):
        """The name of the adapter merged into the kernels, or `None`."""
        return next((w.merged_adapter for w in self.injection.wrappers.values()), None)

    def _check_adapter(self, adapter_name):
        if adapter_name not in self.injection.adapters:
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
        self.train_function = self.predict_function = self.test_function = None
        # A KerasHub generative task compiles its own loop: drop it too.
        if getattr(self.base_model, "generate_function", None) is not None:
            self.base_model.generate_function = None

    @property
    def sample_at_inference(self):
        """Whether inference samples the latent code (Monte Carlo passes)."""
        return self.pvera_config.sample_at_inference

    @sample_at_inference.setter
    def sample_at_inference(self, value):
        if value:
            self._check_not_merged("sample")
        record = self.injection.adapters[self.active_adapter]
        record.config = record.config.replace(sample_at_inference=bool(value))
        for layer in self.adapted_layers.values():
            layer.sample_at_inference = bool(value)
        self._changed()

    @property
    def trainable(self):
        return keras.Model.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        keras.Model.trainable.fset(self, value)
        if getattr(self, "injection", None) is not None:
            self.injection.freeze()  # Toggling never thaws the base.

    def _allowed(self, variable):
        if getattr(self, "allowed_ids", None) is None:
            self.allowed_ids = self.injection.trainable_ids()
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
