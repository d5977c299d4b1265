"""The adapter lifecycle of a `PVeRAModel`, as PEFT has it.

Several named adapters on one model (one or several active: they run,
their outputs add up, and only their vectors train), the base model back
(`disable_adapter`, `unload`), and merging in place (`merge_adapter`,
`unmerge_adapter`, one adapter or several, at once or one after another).
Also what keeps the base frozen whatever `trainable` toggles a user makes.
The structural work is `adapter_registry.AdapterRegistry`'s; this is the
model's public face of it. Where PEFT warns and goes on, so does this.
"""

import contextlib
import warnings

import keras
from keras import ops

from keras_pvera.src.layers import row_adapters
from keras_pvera.src.layers.adapter_layer import check_not_merged
from keras_pvera.src.layers.adapter_layer import one_or_list
from keras_pvera.src.layers.pvera_config import PVeRAConfig
from keras_pvera.src.utils import keras_internals

# Where a model's merged adapters are, in refusals.
BASE_KERNELS = "the base kernels"


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
    >>> model.set_adapter(["default", "other"])  # Their outputs add up.
    >>> model.active_adapters
    ['default', 'other']
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
    def active_adapters(self):
        """The names of the adapters that run and train, a list (PEFT's
        `active_adapters`)."""
        return list(self.adapter_registry.active)

    @property
    def active_adapter(self):
        """The name of the adapter that runs and trains; `None` if none, the
        list of names if several are active."""
        return one_or_list(self.adapter_registry.active)

    @property
    def pvera_config(self):
        """The active adapter's `PVeRAConfig` (the first's, if several)."""
        if not self.active_adapters:
            raise ValueError(
                "The model has no active adapter. Call `model.set_adapter(name)` "
                f"with one of {self.adapter_names}."
            )
        return self.adapter_registry.adapters[self.active_adapters[0]].config

    @property
    def trainable_paths(self):
        """Paths of the layers trained in full beside the adapters (by any
        adapter; each trains its own copy)."""
        return list(self.adapter_registry.trainable_paths)

    @property
    def adapted_layers(self):
        """`{path: PVeRADense}` of the layers the active adapters adapt."""
        return self.adapter_registry.layers_of(self.active_adapters)

    def add_adapter(self, adapter_name, config=None, **settings):
        """Adds a named adapter (PEFT's `add_adapter`); it is not made active.

        Every adapter shares the model's projections, so it needs the first
        adapter's `seed`, `rank` and `save_projection`, and layers no larger
        than the first adapter's. Each adapter trains its own copy of its
        `trainable_layers` (PEFT's `modules_to_save`), made from the
        original layer; `None` trains none (a KerasHub task's head, as for
        the first adapter).

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
        check_not_merged(self.merged_adapters, "add an adapter", BASE_KERNELS)
        config = PVeRAConfig.from_settings(config, **settings)
        self.adapter_registry.add(adapter_name, config, paths, trainable)
        self.adapter_registry.set_active(self.active_adapters)
        self._track_kl(config)
        self._changed()

    def set_adapter(self, adapter_name):
        """Makes `adapter_name` the adapter (or adapters) that run and train.

        Several adapters at once (a list; PEFT's `base_model.set_adapter`)
        run together: their outputs add up, and all their vectors train. A
        layer trained in full runs the copy of the one active adapter that
        trains it; two active adapters cannot both train one.

        As in PEFT, a merged model is unmerged first, with a warning. A
        compiled model gets a fresh optimizer of the same configuration: a
        Keras optimizer serves the one set of variables it was built for.

        Args:
            adapter_name: A name, or a list of names.

        Raises:
            ValueError: For an unknown name, an empty list, or two adapters
                training one layer in full.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        if not isinstance(names, (list, tuple)) or not names:
            raise ValueError(
                "`set_adapter` takes an adapter name or a non-empty list of "
                f"names from {self.adapter_names}. Received: "
                f"adapter_name={adapter_name!r}"
            )
        for name in names:
            self._check_adapter(name)
        if self.merged_adapters:
            warnings.warn(
                "Adapter cannot be set when the model is merged. Unmerging "
                "the model first.",
                stacklevel=2,
            )
            self.unmerge_adapter()
        if list(names) != self.active_adapters:
            self.adapter_registry.set_active(list(names))
            self._renew_optimizer()
        self._changed()

    def _renew_optimizer(self):
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and optimizer.built:
            renewed = optimizer.__class__.from_config(optimizer.get_config())
            # Built for the variables that train now, as a loaded model's
            # optimizer is: a file saved now then loads without a warning.
            self._changed()
            renewed.build(self.trainable_variables)
            with keras_internals.unlocked(self):
                self.optimizer = renewed

    def delete_adapter(self, adapter_name):
        """Deletes an adapter, as PEFT does.

        Deleting an active adapter leaves the other active ones; if none is
        left, the first remaining adapter in sorted order becomes active,
        with a warning (PEFT's choice). Deleting the last adapter leaves a
        model with none, computing the base model's outputs; `add_adapter`
        adds one again, and `unload` gives the base model back.

        Args:
            adapter_name: One of `adapter_names`.

        Raises:
            ValueError: For an unknown name, or an adapter merged into the
                kernels (`unmerge_adapter` first).
        """
        self._check_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are "
                "merged. Please unmerge them first: `model.unmerge_adapter()`."
            )
        was_active = adapter_name in self.active_adapters
        self.adapter_registry.delete(adapter_name)
        remaining = sorted(self.adapter_names)
        if was_active and not self.active_adapters and remaining:
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. "
                f"Setting active adapter to {remaining[0]}.",
                stacklevel=2,
            )
            self.adapter_registry.set_active([remaining[0]])
        self._renew_optimizer()
        self._changed()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this context, the model computes the base model's outputs.

        As in PEFT: adapters merged into the kernels are taken out of the
        computation (on the fly here; the kernels stay merged), layers
        trained in full run their original weights, and nothing trains but
        what trains without adapters (`trainable_weights` lists no adapter
        vector or trained copy). Leaving the context puts each layer back as
        it was; a model whose layers were partly disabled before warns, as
        PEFT does.
        """
        layers = self.adapter_registry.adapter_layers()
        before = [layer.adapter_enabled for layer in layers]
        if len(set(before)) > 1:
            warnings.warn(
                "The model contains some adapter layers that are enabled and "
                "others that are disabled. This is most likely unintentional. "
                "After exiting the disable_adapter context, each layer is "
                "enabled or disabled as it was before.",
                stacklevel=3,
            )
        for layer in layers:
            layer.adapter_enabled = False
        self._changed()
        try:
            yield self
        finally:
            for layer, enabled in zip(layers, before, strict=True):
                layer.adapter_enabled = enabled
            self._changed()

    def unload(self):
        """Takes every adapter out and returns the base model.

        The base model's own layers are back in place (unmerged), except
        that a layer trained in full keeps the weights of the active
        adapter's copy, as PEFT's `unload` keeps it.
        """
        check_not_merged(self.merged_adapters, "unload", BASE_KERNELS)
        self.adapter_registry.unload()
        self._changed()
        return self.base_model

    def merge_adapter(self, adapter_names=None, safe_merge=False):
        """Folds adapters' means into the base kernels, in place (PEFT's
        `merge_adapter`, same arguments).

        Afterwards the merged layers run their base layers alone, so mean
        predictions are unchanged (within float rounding); training and
        sampling are refused until `unmerge_adapter`. Adapters already
        merged are skipped, with PEFT's warnings: merging again changes
        nothing, and merging others adds them.

        Args:
            adapter_names: A list of adapter names; `None` for the active
                adapters.
            safe_merge: Whether to refuse (naming the layers) when a merged
                kernel would hold NaN or infinity; nothing changes then.

        Raises:
            TypeError: If `adapter_names` is not a list (PEFT's check).
            ValueError: With nothing to merge (no active adapter), for an
                unknown name, a quantized base layer, or (with `safe_merge`)
                non-finite kernels.

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
        if adapter_names is None:
            names = self.active_adapters
            if not names:
                raise ValueError(
                    "The model has no active adapter to merge. Call "
                    f"`model.set_adapter(name)` with one of {self.adapter_names}, "
                    "or pass `adapter_names`."
                )
        elif isinstance(adapter_names, (list, tuple)):
            names = list(adapter_names)
            for name in names:
                self._check_adapter(name)
        else:
            raise TypeError(
                f"adapter_names should be a list of strings, got {adapter_names!r}."
            )
        merged = self.merged_adapters
        todo = [n for n in names if n not in merged]
        if merged and not todo:
            warnings.warn(
                "All adapters are already merged, nothing to do.", stacklevel=2
            )
            return
        if merged:
            warnings.warn(
                f"Already following adapters were merged {','.join(merged)}. "
                f"You are now additionally merging {','.join(todo)}.",
                stacklevel=2,
            )
        adapter_deltas(self, safe_merge, todo)  # Checks before any change.
        for layer in self.adapter_registry.wrappers.values():
            layer.merge(todo)
        self._changed()

    def unmerge_adapter(self):
        """Takes every merged adapter back out of the base kernels (PEFT's
        `unmerge_adapter`), last merged first.

        With nothing merged, it warns and does nothing, as PEFT does.
        """
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        for layer in self.adapter_registry.wrappers.values():
            layer.unmerge()
        self._changed()

    # While `adapters_by_row` is open: the names the rows' indices point
    # into, and each layer's vectors of them, stacked (`row_tables`; `None`
    # where the layers stack them inside a compiled function).
    row_adapter_names = ()
    row_adapter_tables = None

    @contextlib.contextmanager
    def adapters_by_row(self, adapter_names, num_examples):
        """Within this context, the model runs each example's own adapter.

        What `predict`, `generate` and `predict_with_uncertainty` open when
        given `adapter_names`. Inputs must reach the model packed with the
        indices this yields (`row_adapters.pack`), so that Keras batches
        them with the examples.

        A model that runs eagerly (torch, or `run_eagerly=True`) indexes
        the rows into the call's adapters, and each adapted layer stacks
        their vectors once, here, for every batch of the call. A compiled
        one (JAX, TensorFlow, `jit_compile=True` on torch) indexes them
        into `"__base__"` and every loaded adapter, in the order they were
        added, and its layers stack the vectors from their variables inside
        the trace: nothing the call names is traced, so one compiled
        predict function serves every call (adding or deleting an adapter
        drops it, as any change of adapters does).

        Args:
            adapter_names: One loaded adapter name per example, or
                `"__base__"` for the base model.
            num_examples: The number of examples.

        Yields:
            A tuple `(names, indices)`: the adapters the call names, in
            order of first appearance, and each example's index into
            `row_adapter_names`.

        Raises:
            ValueError: For names not loaded, a count other than
                `num_examples`, or adapters merged into the kernels.
        """
        eager = self.run_eagerly or (
            keras.backend.backend() == "torch" and not self.jit_compile
        )
        order = None if eager else (row_adapters.BASE_MODEL, *self.adapter_names)
        names, indices = row_adapters.index_rows(
            adapter_names,
            self.adapter_names,
            num_examples,
            self.merged_adapters,
            order,
        )
        self.row_adapter_names = names if eager else order
        if eager:
            self.row_adapter_tables = {
                id(layer): layer.row_tables(names)
                for layer in self.adapter_registry.wrappers.values()
            }
        try:
            yield names, indices
        finally:
            self.row_adapter_names = ()
            self.row_adapter_tables = None

    @property
    def merged_adapters(self):
        """The names of the adapters merged into the kernels, in merge order."""
        names = [
            n for w in self.adapter_registry.wrappers.values() for n in w.merged_names
        ]
        return list(dict.fromkeys(names))

    @property
    def merged_adapter(self):
        """The name of the adapter merged into the kernels; `None` if none,
        the list of names if several."""
        return one_or_list(self.merged_adapters)

    def _check_adapter(self, adapter_name):
        if adapter_name not in self.adapter_registry.adapters:
            raise ValueError(
                f"No adapter named {adapter_name!r}. Adapters: {self.adapter_names}"
            )

    def _track_kl(self, config):
        """Makes the `kl_loss` metric once an adapter has a KL term."""
        if config.kl_weight > 0 and getattr(self, "kl_tracker", None) is None:
            with keras_internals.unlocked(self):
                self.kl_tracker = keras.metrics.Mean(name="kl_loss")

    def _changed(self):
        self.allowed_ids = None
        keras_internals.drop_compiled_functions(self)
        keras_internals.track_torch_parameters(self)

    @property
    def sample_at_inference(self):
        """Whether inference samples the latent code (Monte Carlo passes).

        Stored in the active adapters' layers; on when any of them samples.
        Setting it sets every one of them.
        """
        _ = self.pvera_config  # Raises with no active adapter.
        return any(
            self.adapter_registry.adapters[n].config.sample_at_inference
            for n in self.active_adapters
        )

    @sample_at_inference.setter
    def sample_at_inference(self, value):
        if value:
            check_not_merged(self.merged_adapters, "sample", BASE_KERNELS)
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


def adapter_deltas(model, safe_merge, adapter_names=None):
    """`{id(wrapper): delta_kernel}` of adapters not yet merged, checked.

    The sum, per layer, of the deltas of `adapter_names` (`None`: the active
    adapters) that the layer holds and has not merged. Used by
    `merge_adapter` and by `keras_pvera.merge`.

    Raises:
        ValueError: For a quantized base layer, or (with `safe_merge`) a
            kernel that would hold NaN or infinity (one reduction a layer).
    """
    names = model.active_adapters if adapter_names is None else adapter_names
    deltas, bad = {}, []
    for path, layer in model.adapter_registry.layers_of(list(names)).items():
        if id(layer) in deltas or not layer._unmerged(names):
            continue
        if layer.base_layer.quantization_mode is not None:
            raise ValueError(
                f"Layer {path!r} is quantized "
                f"(mode={layer.base_layer.quantization_mode!r}); merging "
                "folds the adapter into float kernels, and adding it to a "
                "quantized kernel would round most of it away. Keep the "
                "adapted model (it runs the quantized base with the adapter "
                "beside it), or save the adapter (`keras_pvera.save_adapter`), "
                "load it onto the float base model "
                "(`keras_pvera.load_adapter(float_base, path)`) and merge "
                "that; quantize the merged model afterwards if you want."
            )
        deltas[id(layer)] = delta = layer.merge_delta(names)
        if safe_merge:
            kernel = ops.add(layer.base_kernel, delta)
            if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(kernel)))):
                bad.append(path)
    if bad:
        raise ValueError(
            f"Merging would put NaN or infinity into the kernels of {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}: their adapter vectors "
            "diverged. Nothing was merged; train again with a lower learning "
            "rate or gradient clipping."
        )
    return deltas
