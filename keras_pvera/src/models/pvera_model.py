"""`PVeRAModel` and `apply`: a Keras model adapted with PVeRA.

`apply` adapts a model's layers (through `adapter_registry.AdapterRegistry`) and returns
a `PVeRAModel`, a plain Keras model that trains with `fit`, reports the KL
term as `kl_loss`, holds several named adapters (one or several active), and
saves to `.keras`: the base model's configuration as it was before
adaptation, each adapter's settings and adapted paths, then every weight.
"""

import contextlib
import warnings

import keras
from keras import ops

from keras_pvera.src.layers import row_adapters
from keras_pvera.src.layers.adapter_layer import check_not_merged
from keras_pvera.src.layers.pvera_config import PVeRAConfig
from keras_pvera.src.layers.pvera_config import split_settings
from keras_pvera.src.models import model_export
from keras_pvera.src.models import model_summary
from keras_pvera.src.models import task_workflow
from keras_pvera.src.models.adapter_lifecycle import BASE_KERNELS
from keras_pvera.src.models.adapter_lifecycle import AdapterLifecycle
from keras_pvera.src.surgery import adapter_registry as adapter_registry_lib
from keras_pvera.src.surgery import layer_selection
from keras_pvera.src.uncertainty import generation
from keras_pvera.src.uncertainty import monte_carlo
from keras_pvera.src.uncertainty import output_kinds
from keras_pvera.src.uncertainty import sampled_model as sampled_model_lib
from keras_pvera.src.uncertainty import shared_prefix
from keras_pvera.src.uncertainty import temperature_scaling as calibration_lib
from keras_pvera.src.utils import array_inputs
from keras_pvera.src.utils import keras_hub_tasks
from keras_pvera.src.utils import keras_internals


def apply(model, rank=None, *, config=None, name=None, **settings):
    """Adapts a Keras model with PVeRA.

    The chosen layers are wrapped in place in `PVeRADense` layers sharing
    one `ProjectionRegistry`; every other weight is frozen. Right after
    `apply`, the model's predictions equal the base model's.

    Args:
        model: A built Keras model (Sequential, Functional, subclassed, or a
            KerasHub model).
        rank: Latent size `r` (PEFT's `r`); default 256.
        config: A `PVeRAConfig`; `None` for the defaults.
        name: The adapted model's name; `None`: `"pvera_"` and the base
            model's name.
        **settings: Any `PVeRAConfig` setting by name (`target`, `seed`,
            `alpha`, `d_initial`, `dropout`, `kl_weight`, `save_projection`,
            `sample_at_inference`, `trainable_layers`); overrides `config`.

    Returns:
        A `PVeRAModel` whose first adapter is named `"default"`. The base
        model's layers are shared with it, not copied: keep using the
        returned model.

    Raises:
        ValueError: For a bad or unknown setting, an unbuilt model, an already
            adapted model, or a `target` that matches no layer.
        TypeError: For a `target` that matches a layer that is not Dense or
            EinsumDense.

    Example:

    >>> import numpy as np
    >>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
    ...                          keras.layers.Dense(3)])
    >>> model = apply(base, rank=4)
    >>> x = np.ones((2, 8), "float32")
    >>> bool(np.array_equal(model.predict(x, verbose=0),
    ...                     base.predict(x, verbose=0)))
    True
    """
    if rank is not None:
        settings["rank"] = rank
    config = PVeRAConfig.from_settings(config, **settings)
    return PVeRAModel(model, config=config, name=name)


@keras.saving.register_keras_serializable(package="keras_pvera")
class PVeRAModel(AdapterLifecycle, model_summary.ModelSummary, keras.Model):
    """A Keras model adapted with PVeRA. Made by `keras_pvera.apply`.

    Calls the adapted base model; adds `kl_loss` to training logs when the
    active adapter's `kl_weight > 0`; holds named adapters (`add_adapter`,
    `set_adapter`, `delete_adapter`; the active ones run, their outputs
    adding up, and only their vectors train); gives the base model back
    (`disable_adapter`, `unload`); merges in place (`merge_adapter`,
    `unmerge_adapter`); saves to `.keras` (loading needs only
    `import keras_pvera`).

    Args:
        base_model: The Keras model to adapt (changed in place).
        config: The first adapter's `PVeRAConfig` (or settings by name in
            `**kwargs`).
        adapter_name: The first adapter's name.
        adapted_paths: Paths of the adapted layers, instead of selecting
            them (loading).
        trainable_paths: Paths of the layers the first adapter trains in
            full, instead of selecting them (loading).
        trained_in_place: Whether layers trained in full train in place,
            shared by every adapter (files written before each adapter
            trained its own copy); new models keep one copy per adapter.
        base_model_config: The serialized base model before adaptation.
        calibration: Temperature scaling, as `keras_pvera.calibrate` sets
            it (`{"temperature": T, "from_logits": bool}`), or `None`.
        **kwargs: PVeRA settings by name, and `keras.Model` keyword
            arguments such as `name` (default: `"pvera_"` and the base
            model's name).

    Example:

    >>> base = keras.Sequential([keras.Input((8,)),
    ...                          keras.layers.Dense(16, name="hidden"),
    ...                          keras.layers.Dense(3, name="head")])
    >>> model = PVeRAModel(base, rank=4)
    >>> list(model.adapted_layers), model.adapter_names
    (['hidden'], ['default'])
    >>> model.name == "pvera_" + base.name
    True
    """

    def __init__(
        self,
        base_model,
        config=None,
        adapter_name="default",
        adapted_paths=None,
        trainable_paths=None,
        base_model_config=None,
        calibration=None,
        trained_in_place=False,
        **kwargs,
    ):
        settings, kwargs = split_settings(kwargs)
        config = PVeRAConfig.from_settings(config, **settings)
        calibration = calibration_lib.check_calibration(calibration)
        adapter_registry_lib.check_base_model(base_model)
        if base_model_config is None:
            try:
                base_model_config = keras.saving.serialize_keras_object(base_model)
            except Exception as e:  # Only needed to save; kept for the error.
                base_model_config = {"error": f"{type(e).__name__}: {e}"}
        adapter_registry = adapter_registry_lib.AdapterRegistry(
            base_model, in_place=trained_in_place
        )
        adapter_registry.add(adapter_name, config, adapted_paths, trainable_paths)
        if kwargs.get("name") is None:
            kwargs["name"] = f"pvera_{base_model.name}"
        super().__init__(**kwargs)
        self.base_model = base_model
        self.projection_registry = adapter_registry.registry
        # Plain objects: Keras tracks neither (the layers live in base_model).
        self.adapter_registry = adapter_registry
        self.base_model_config = base_model_config
        # Post-hoc temperature scaling (keras_pvera.calibrate), beyond the
        # paper: applied to inference outputs, saved in the config.
        self.temperature_scaling = calibration
        self._track_kl(config)
        self.built = True
        # A KerasHub task may hold a loop compiled before its layers were
        # wrapped (TensorFlow would keep running the base layers): drop it.
        self._changed()

    @property
    def calibration(self):
        """The temperature scaling set by `keras_pvera.calibrate`, or `None`.

        A dict `{"temperature": T, "from_logits": bool}`: inference outputs
        (every Monte Carlo pass, and `predict` with sampling off) are
        tempered, training is not. Set it to `None` to remove it.
        """
        scaling = self.temperature_scaling
        return None if scaling is None else dict(scaling)

    @calibration.setter
    def calibration(self, value):
        self.temperature_scaling = calibration_lib.check_calibration(value)
        keras_internals.drop_compiled_functions(self)

    def call(self, inputs, training=None):
        # Layers reading one input (attention's query and value) share x @ A.
        # Packed inputs carry each example's adapter (`adapters_by_row`).
        inputs, indices = row_adapters.unpack(inputs)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.projection_registry.sharing_products())
            if indices is not None:
                stack.enter_context(
                    row_adapters.selecting(
                        self.row_adapter_names, indices, self.row_adapter_tables
                    )
                )
            # Within a Monte Carlo run, the layers before sampling run once.
            outputs = shared_prefix.call_model(self.base_model, inputs, training)
        scaling = self.temperature_scaling
        if scaling is not None and not training:
            outputs = calibration_lib.apply_temperature(
                outputs, scaling["temperature"], scaling["from_logits"]
            )
        return outputs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
        loss = super().compute_loss(x, y, y_pred, sample_weight, **kw)
        kl_weight = self.pvera_config.kl_weight if self.active_adapters else 0
        if kl_weight > 0 and kw.get("training", True):
            terms = _kl_terms(self)
            if terms:
                self.kl_tracker.update_state(
                    ops.divide(ops.sum(ops.stack(terms)), kl_weight)
                )
        return loss

    def fit(self, *args, **kwargs):
        check_not_merged(self.merged_adapters, "train", BASE_KERNELS)
        self.adapter_registry.freeze()
        # A KerasHub task's raw inputs go through its preprocessor.
        args, kwargs = task_workflow.fit_arguments(self, args, kwargs)
        history = super().fit(*args, **kwargs)
        try:
            self.check_finite()
        except ValueError as e:
            warnings.warn(str(e), stacklevel=2)
        return history

    def predict(self, x, *args, adapter_names=None, **kwargs):
        """As `keras.Model.predict`, and each example with its own adapter.

        Args:
            x: Inputs, as for `keras.Model.predict` (raw inputs for a
                KerasHub task with a preprocessor).
            *args: As for `keras.Model.predict`.
            adapter_names: `None` (the active adapters run), or one loaded
                adapter name per example (`"__base__"`: the base model), for
                array (or raw task) inputs: every example gets what its
                adapter alone gives it, in one pass over the batch.
            **kwargs: As for `keras.Model.predict`.

        Returns:
            As `keras.Model.predict`.
        """
        self.check_finite()
        if adapter_names is None:
            args, kwargs = task_workflow.predict_arguments(self, (x, *args), kwargs)
            return super().predict(*args, **kwargs)
        x = keras_hub_tasks.preprocessed_arrays(self, x)
        num_examples = array_inputs.num_examples(x)
        with self.adapters_by_row(adapter_names, num_examples) as (_, indices):
            return super().predict(row_adapters.pack(x, indices), *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        self.check_finite()
        args, kwargs = task_workflow.evaluate_arguments(self, args, kwargs)
        logs = super().evaluate(*args, **kwargs)
        if isinstance(logs, dict):
            logs.pop("kl_loss", None)  # A training term: no val_kl_loss 0.
        return logs

    def __getattr__(self, name):
        # Only reached for a missing attribute; torch's modules look first.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return task_workflow.task_attribute(self, name)

    def predict_with_uncertainty(self, x, n=30, **kwargs):
        """`keras_pvera.predict_with_uncertainty(self, x, n, **kwargs)`."""
        return monte_carlo.predict_with_uncertainty(self, x, n=n, **kwargs)

    def generate_with_uncertainty(self, inputs, n=10, **kwargs):
        """`keras_pvera.generate_with_uncertainty(self, inputs, n, **kwargs)`."""
        return generation.generate_with_uncertainty(self, inputs, n=n, **kwargs)

    def sampled_model(self):
        """What a Monte Carlo run needs of this model, a `SampledModel`
        (`uncertainty.sampled_model.read_model` asks it once per run)."""
        return sampled_model_lib.SampledModel(
            model=self,
            adapted_layers=self.adapted_layers,
            noise_streams=tuple(self.adapter_registry.wrappers.values()),
            output_kinds=output_kinds.calibrated_kinds(
                output_kinds.output_kinds(self.base_model), self.calibration
            ),
            task=keras_hub_tasks.task_of(self),
            calibration=self.calibration,
            layers_of=self.adapter_registry.layers_of,
        )

    def quantize(self, mode=None, *args, **kwargs):
        """Refuses: quantize the base model before `keras_pvera.apply`.

        Raises:
            ValueError: Always. The saved file rebuilds the base model from
                its configuration before adaptation, so weights quantized
                afterwards would not load back.
        """
        raise ValueError(
            "Quantize the base model before keras_pvera.apply, not the "
            f"adapted model: `base.quantize({mode!r}); model = "
            "keras_pvera.apply(base, ...)`. The adapted model saves the base "
            "model's configuration as it was when PVeRA was applied, so "
            "quantizing afterwards would not round-trip."
        )

    def save(self, filepath, *args, **kwargs):
        """As `keras.Model.save`, to a `.keras` file (loading needs only
        `import keras_pvera`).

        Raises:
            ValueError: For a legacy `.h5` / `.hdf5` path: an adapted model
                saved there does not load back.
        """
        if str(filepath).lower().endswith((".h5", ".hdf5")):
            raise ValueError(
                "An adapted model saves to the `.keras` format only: a legacy "
                "HDF5 file of it does not load back. Save it as "
                "`model.save('model.keras')`, or merge the adapter first and "
                "save a plain Keras model (`keras_pvera.merge(model)`). "
                f"Received: filepath={str(filepath)!r}"
            )
        return super().save(filepath, *args, **kwargs)

    def export(
        self,
        filepath,
        format="tf_saved_model",
        verbose=None,
        input_signature=None,
        **kwargs,
    ):
        """As `keras.Model.export`: the adapted model's mean, for serving.

        The input signature is the base model's unless given, so an adapted
        model exports wherever its base model does: ONNX (torch backend),
        a SavedModel (TensorFlow, JAX), LiteRT (TensorFlow), `torch.export`
        (torch), OpenVINO where its package is installed. The artefact
        computes what `predict` does with sampling off. The Monte Carlo
        statistics are served by `keras_pvera.export_with_uncertainty`.

        Args:
            filepath: Where to write (`.onnx`, `.tflite`, `.pt2`, `.xml`
                for those formats; a folder for a SavedModel).
            format: As for `keras.Model.export`.
            verbose: As for `keras.Model.export`.
            input_signature: As for `keras.Model.export`; `None`: the base
                model's inputs.
            **kwargs: As for `keras.Model.export`.

        Raises:
            ValueError: For a format Keras cannot write on this backend
                (naming those it can), a model that samples at inference,
                or a subclassed base model never called (no signature).
        """
        model_export.export(self, filepath, format, verbose, input_signature, **kwargs)

    def summary(self, *args, print_fn=None, **kwargs):
        super().summary(*args, print_fn=print_fn, **kwargs)
        self.pvera_summary(print_fn=print_fn)

    def get_config(self):
        if "error" in self.base_model_config:
            raise ValueError(
                "The base model could not be serialized, so this PVeRA model "
                f"cannot be saved as .keras: {self.base_model_config['error']}. "
                "Give the base model a complete `get_config`, or save the "
                "adapter weights only."
            )
        if not self.adapter_names:
            raise ValueError(
                "The model has no adapter left to save (all were deleted). "
                "Add one with `model.add_adapter(...)`, or save the base "
                "model: `model.unload().save(...)`."
            )
        registry = self.adapter_registry
        return {
            "name": self.name,
            "trainable": self.trainable,
            "base_model_config": self.base_model_config,
            # Each adapter with the layers it adapts and those it trains in
            # full (its own copies); `trained_in_place` for files written
            # before copies.
            "adapters": [
                [name, record.config.to_dict(), record.paths, record.trainable_paths]
                for name, record in registry.adapters.items()
            ],
            "active_adapter": self.active_adapters,
            "adapters_enabled": [
                layer.adapter_enabled for layer in registry.adapter_layers()
            ],
            "trained_in_place": registry.in_place,
            "calibration": self.calibration,
            # Finds the layers again where Keras names them otherwise.
            "layer_addresses": layer_selection.layer_addresses(
                self.base_model, self._saved_paths()
            ),
        }

    def _saved_paths(self):
        paths = [
            p
            for record in self.adapter_registry.adapters.values()
            for p in record.paths
        ]
        return list(dict.fromkeys(paths + self.trainable_paths))

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base = keras_internals.deserialize_model(config["base_model_config"])
        if "adapters" not in config:  # Written before named adapters.
            settings, config = split_settings(config)
            config["adapters"] = [["default", settings, config.pop("adapted_paths")]]
        adapters = config.pop("adapters")
        # Written before each adapter trained its own copies of the layers
        # trained in full: one list, shared, trained in place.
        shared = config.pop("trainable_paths", None)
        if shared is not None:
            config["trained_in_place"] = True
            adapters = [[n, s, paths, shared] for n, s, paths in adapters]
        # Paths as the rebuilt base names its layers (`bert_backbone_1/...`).
        saved = [p for _, _, paths, in_full in adapters for p in paths + in_full]
        where = layer_selection.resolve_paths(
            base, list(dict.fromkeys(saved)), config.pop("layer_addresses", None)
        )
        adapters = [
            [
                n,
                _fused_at(s, where),
                [where[p] for p in paths],
                [where[p] for p in in_full],
            ]
            for n, s, paths, in_full in adapters
        ]
        (name, settings, paths, in_full), *others = adapters
        active = config.pop("active_adapter", name)
        enabled = config.pop("adapters_enabled", None)
        model = cls(
            base,
            PVeRAConfig.from_dict(settings),
            adapter_name=name,
            adapted_paths=paths,
            trainable_paths=in_full,
            **config,
        )
        for other, settings, paths, in_full in others:
            model.add_adapter(
                other,
                PVeRAConfig.from_dict(settings),
                adapted_paths=paths,
                trainable_paths=in_full,
            )
        active = [active] if isinstance(active, str) else active
        if active != model.active_adapters:
            model.adapter_registry.set_active(active)
        if enabled is not None:
            layers = model.adapter_registry.adapter_layers()
            for layer, on in zip(layers, enabled, strict=True):
                layer.adapter_enabled = on
        return model


def _kl_terms(model):
    """The KL terms the active adapter's layers added in this forward pass.

    Each adapted layer adds `kl_weight * KL` with `add_loss` while training;
    they are picked out of the model's losses by identity, so the wrapped
    base layer's own losses (an activity regularizer) are left out.
    """
    ids = set()
    for layer in model.adapted_layers.values():
        ids.update(keras_internals.own_loss_ids(layer))
    return [t for t in model.losses if id(t) in ids]


def _fused_at(settings, where):
    """Settings with their `fused_groups` under the rebuilt model's paths."""
    groups = settings.get("fused_groups")
    if not groups:
        return settings
    return {**settings, "fused_groups": [[where[p] for p in g] for g in groups]}
