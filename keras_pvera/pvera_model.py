"""`PVeRAModel` and `apply`: a Keras model adapted with PVeRA.

`apply` wraps chosen `Dense`/`EinsumDense` layers of a model in `PVeRADense`
layers that share one `ProjectionRegistry`, freezes everything else, and
returns a `PVeRAModel`, a plain Keras model that trains with `fit`, reports
the KL term as `kl_loss`, and saves to `.keras`.

Saving stores the base model's configuration as it was before adaptation and
the paths of the adapted layers; loading rebuilds the base model and adapts
the same layers again, then restores every weight.
"""

import re
import warnings

import keras
import numpy as np
from keras import ops

from keras_pvera import calibration as calibration_lib
from keras_pvera import model_surgery
from keras_pvera.projection_registry import ProjectionRegistry
from keras_pvera.pvera_dense import PVeRADense
from keras_pvera.pvera_dense import derive_seed
from keras_pvera.pvera_dense import linear_equation_of
from keras_pvera.pvera_dense import validate_settings

LINEAR_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense)

# KerasHub's default LoRA targets (`Backbone.enable_lora`).
KERAS_HUB_TARGETS = ("query", "value", "query_dense", "value_dense")


def select_layers(model, selector, what="target"):
    """Resolves a layer selector to `{path: layer}`.

    Args:
        model: A Keras model.
        selector: A list of layer names (each name matches every layer of
            that name at any depth, and must match one), a regex string
            (full match against a layer's name or path), or a callable
            `(layer) -> bool`.
        what: The argument's name, for error messages.

    Returns:
        A dict from path to layer, in model order.

    Example:

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(8, name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    >>> list(select_layers(model, ["hidden"]))
    ['hidden']
    """
    layers = list(model_surgery.iter_layers(model))
    if callable(selector) and not isinstance(selector, str):
        return {p: layer for p, layer in layers if selector(layer)}
    if isinstance(selector, str):
        try:
            pattern = re.compile(selector)
        except re.error as e:
            raise ValueError(
                f"`{what}` is not a valid regular expression: {e}. "
                f"Received: {what}={selector!r}"
            ) from None
        return {
            p: layer
            for p, layer in layers
            if pattern.fullmatch(layer.name) or pattern.fullmatch(p)
        }
    if isinstance(selector, (list, tuple, set)):
        names = list(selector)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"`{what}` names must be strings. Received: {bad[0]!r}")
        missing = [n for n in names if not any(lyr.name == n for _, lyr in layers)]
        if missing:
            raise ValueError(
                f"`{what}` name {missing[0]!r} matches no layer of "
                f"model {model.name!r}. Candidates: "
                f"{_candidates(layers)}"
            )
        return {p: layer for p, layer in layers if layer.name in names}
    raise TypeError(
        f"`{what}` must be a list of layer names, a regex string, a callable "
        f"`(layer) -> bool` or 'all'. Received: {what}={selector!r}"
    )


def _candidates(layers):
    names = sorted(
        {layer.name for _, layer in layers if isinstance(layer, LINEAR_LAYERS)}
    )
    return names or sorted({layer.name for _, layer in layers})


def _select_targets(model, target):
    layers = list(model_surgery.iter_layers(model))
    if target is None:
        names = {layer.name for _, layer in layers}
        if any(name in names for name in KERAS_HUB_TARGETS):
            target = [n for n in KERAS_HUB_TARGETS if n in names]
        else:
            target = "all"
    if target == "all":
        excluded = {id(layer) for layer in model_surgery.output_layers(model)}
        chosen = {
            p: layer
            for p, layer in layers
            if isinstance(layer, LINEAR_LAYERS) and id(layer) not in excluded
        }
    else:
        chosen = select_layers(model, target, "target")
    if not chosen:
        raise ValueError(
            f"`target` matches no layer of model {model.name!r}. "
            f"Received: target={target!r}. Candidates: {_candidates(layers)}"
        )
    for path, layer in chosen.items():
        if not isinstance(layer, LINEAR_LAYERS):
            raise TypeError(
                f"PVeRA adapts keras.layers.Dense and keras.layers.EinsumDense "
                f"layers, but target {target!r} matches {path!r} of type "
                f"{type(layer).__name__}."
            )
        if not layer.built:
            raise ValueError(
                f"Layer {path!r} is not built. Build the model first: call it "
                "on a batch of data (`model(x[:1])`) or call "
                "`model.build(input_shape)`."
            )
    return chosen


def apply(
    model,
    rank=256,
    *,
    target=None,
    seed=0,
    alpha=1.0,
    d_initial=0.1,
    dropout=0.0,
    kl_weight=0.0,
    save_projection=True,
    sample_at_inference=False,
    trainable_layers=None,
):
    """Adapts a Keras model with PVeRA.

    The chosen layers are wrapped in place in `PVeRADense` layers sharing
    one `ProjectionRegistry`; every other weight is frozen. Right after
    `apply`, the model's predictions equal the base model's.

    Args:
        model: A built Keras model (Sequential, Functional, subclassed, or a
            KerasHub model).
        rank: Latent size `r` (PEFT's `r`), a positive integer.
        target: Which layers to adapt: a list of layer names (a name matches
            every layer of that name at any depth), a regex string matched
            against layer names and paths, a callable `(layer) -> bool`, or
            `"all"` (every Dense/EinsumDense except those producing the
            model's outputs). `None`: KerasHub's convention (`query`,
            `value`, `query_dense`, `value_dense`) when the model has such
            layers, else `"all"`.
        seed: Seed of the shared projections and of the sampling noise (PEFT's
            `projection_prng_key`).
        alpha: Output scale of the adapters (PEFT has none: 1).
        d_initial: Initial value of `lambda_d` (PEFT's `d_initial`).
        dropout: Dropout rate on the adapters' input (PEFT's
            `pvera_dropout`).
        kl_weight: Weight of the KL term added to the training loss; 0 turns
            it off. The paper used 1e-16 to 1e-6.
        save_projection: Whether saved files hold the projections (PEFT's
            `save_projection`); if not, they are regenerated from `seed`.
        sample_at_inference: Whether inference samples the latent code
            (PEFT's `sample_at_inference`). Switch later with
            `model.sample_at_inference = ...`.
        trainable_layers: Layers that train in full beside the adapters, for
            example a new head (PEFT's `modules_to_save`): a list of names, a
            regex string or a callable, as for `target`.

    Returns:
        A `PVeRAModel`. The base model's layers are shared with it, not
        copied: keep using the returned model.

    Raises:
        ValueError: For a bad setting, an unbuilt model, an already adapted
            model, or a `target` that matches no layer.
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
    return PVeRAModel(
        model,
        rank=rank,
        target=target,
        seed=seed,
        alpha=alpha,
        d_initial=d_initial,
        dropout=dropout,
        kl_weight=kl_weight,
        save_projection=save_projection,
        sample_at_inference=sample_at_inference,
        trainable_layers=trainable_layers,
    )


@keras.saving.register_keras_serializable(package="keras_pvera")
class PVeRAModel(keras.Model):
    """A Keras model adapted with PVeRA. Made by `keras_pvera.apply`.

    Calls the adapted base model. Adds the `kl_loss` metric to training logs
    when `kl_weight > 0`, switches sampling at inference with
    `sample_at_inference`, and saves to `.keras` (loading needs only
    `import keras_pvera`).

    Args:
        base_model: The Keras model to adapt (changed in place).
        rank, target, seed, alpha, d_initial, dropout, kl_weight,
        save_projection, sample_at_inference, trainable_layers: As for
            `keras_pvera.apply`.
        adapted_paths: Paths of the layers to adapt, instead of `target`
            (used when loading).
        trainable_paths: Paths of fully trainable layers, instead of
            `trainable_layers` (used when loading).
        base_model_config: The serialized base model before adaptation
            (used when loading).
        **kwargs: `name` and other `keras.Model` keyword arguments.

    Returns:
        A `keras.Model` whose calls run the adapted base model.

    Raises:
        ValueError: As `keras_pvera.apply` (bad settings, no layer matched,
            a model already adapted).

    Example:

    >>> base = keras.Sequential([keras.Input((8,)),
    ...                          keras.layers.Dense(16, name="hidden"),
    ...                          keras.layers.Dense(3, name="head")])
    >>> model = PVeRAModel(base, rank=4)
    >>> list(model.adapted_layers)
    ['hidden']
    """

    def __init__(
        self,
        base_model,
        rank=256,
        target=None,
        seed=0,
        alpha=1.0,
        d_initial=0.1,
        dropout=0.0,
        kl_weight=0.0,
        save_projection=True,
        sample_at_inference=False,
        trainable_layers=None,
        adapted_paths=None,
        trainable_paths=None,
        base_model_config=None,
        calibration=None,
        **kwargs,
    ):
        validate_settings(rank, alpha, d_initial, dropout, kl_weight)
        calibration = calibration_lib.check_calibration(calibration)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(
                f"`seed` must be a non-negative integer. Received: seed={seed!r}"
            )
        if not isinstance(base_model, keras.Model):
            raise TypeError(
                "keras_pvera.apply adapts a keras.Model. Received: "
                f"{base_model!r} of type {type(base_model).__name__}"
            )
        if isinstance(base_model, PVeRAModel) or any(
            isinstance(layer, PVeRADense)
            for _, layer in model_surgery.iter_layers(base_model)
        ):
            raise ValueError(
                f"Model {base_model.name!r} is already adapted with PVeRA. "
                "Apply PVeRA to the original model once; to change settings, "
                "start again from the base model."
            )
        if not base_model.built:
            raise ValueError(
                f"Model {base_model.name!r} is not built, so its layer sizes "
                "are unknown. Call it on a batch of data (`model(x[:1])`) or "
                "call `model.build(input_shape)` before keras_pvera.apply."
            )
        layers = dict(model_surgery.iter_layers(base_model))
        if adapted_paths is None:
            targets = _select_targets(base_model, target)
        else:
            targets = {p: _layer_at(layers, p) for p in adapted_paths}
        if trainable_paths is None:
            trainable = (
                {}
                if trainable_layers is None
                else select_layers(base_model, trainable_layers, "trainable_layers")
            )
        else:
            trainable = {p: _layer_at(layers, p) for p in trainable_paths}
        overlap = sorted(set(targets) & set(trainable))
        if overlap:
            raise ValueError(
                f"Layer {overlap[0]!r} is both a PVeRA target and in "
                "`trainable_layers`; a layer is either adapted or trained "
                "in full."
            )
        if base_model_config is None:
            try:
                base_model_config = keras.saving.serialize_keras_object(base_model)
            except Exception as e:  # Only needed to save; kept for the error.
                base_model_config = {"error": f"{type(e).__name__}: {e}"}

        super().__init__(**kwargs)
        self.rank = rank
        self.seed = seed
        self.alpha = float(alpha)
        self.d_initial = float(d_initial)
        self.dropout = float(dropout)
        self.kl_weight = float(kl_weight)
        self.save_projection = bool(save_projection)
        self._sample_at_inference = bool(sample_at_inference)
        # Post-hoc temperature scaling (keras_pvera.calibrate), beyond the
        # paper: applied to inference outputs, saved in the config.
        self._calibration = calibration
        self._base_model_config = base_model_config
        self.trainable_paths = list(trainable)

        linears = [linear_equation_of(layer) for layer in targets.values()]
        originals = [
            (layer, layer.activation, layer.trainable) for layer in targets.values()
        ]
        wrappers, undo = {}, None
        try:
            registry = ProjectionRegistry(
                rank=rank,
                in_max=max(linear.in_dim for linear in linears),
                out_max=max(linear.out_dim for linear in linears),
                seed=seed,
                save_projection=save_projection,
                name="projection_registry",
            )
            for i, (path, layer) in enumerate(targets.items()):
                wrappers[path] = PVeRADense(
                    layer,
                    rank=rank,
                    alpha=alpha,
                    d_initial=d_initial,
                    dropout=dropout,
                    kl_weight=kl_weight,
                    sample_at_inference=sample_at_inference,
                    seed=derive_seed(seed, i),
                    save_projection=save_projection,
                    projection_registry=registry,
                    name=layer.name,
                )
            undo = model_surgery.replace_layers(
                base_model,
                {targets[p]: wrappers[p] for p in targets},
            )
            _freeze(base_model, wrappers.values(), trainable.values())
        except Exception:
            for layer, activation, layer_trainable in originals:
                layer.activation = activation
                layer.trainable = layer_trainable
            if undo is not None:
                undo()
            raise
        self.base_model = base_model
        self.projection_registry = registry
        # Untracked: the adapters are saved and listed under base_model.
        object.__setattr__(self, "_adapters", wrappers)
        if self.kl_weight > 0:
            self.kl_tracker = keras.metrics.Mean(name="kl_loss")
        self.built = True

    @property
    def adapted_layers(self):
        """A dict from layer path to its `PVeRADense` wrapper."""
        return dict(self._adapters)

    @property
    def base_model_config(self):
        """The base model serialized as it was before adaptation."""
        return self._base_model_config

    @property
    def pvera_config(self):
        """The settings `apply` was given, with the adapted layers' paths."""
        return {
            "rank": self.rank,
            "seed": self.seed,
            "alpha": self.alpha,
            "d_initial": self.d_initial,
            "dropout": self.dropout,
            "kl_weight": self.kl_weight,
            "save_projection": self.save_projection,
            "sample_at_inference": self.sample_at_inference,
            "adapted_paths": list(self._adapters),
            "trainable_paths": list(self.trainable_paths),
        }

    @property
    def sample_at_inference(self):
        """Whether inference samples the latent code (Monte Carlo passes).

        Setting it switches every adapted layer and drops compiled predict
        and evaluate functions, so the next call sees the new state.
        """
        return self._sample_at_inference

    @sample_at_inference.setter
    def sample_at_inference(self, value):
        value = bool(value)
        self._sample_at_inference = value
        for layer in self.adapted_layers.values():
            layer.sample_at_inference = value
        self.predict_function = None
        self.test_function = None

    @property
    def calibration(self):
        """The temperature scaling set by `keras_pvera.calibrate`, or `None`.

        A dict `{"temperature": T, "from_logits": bool}`: inference outputs
        (every Monte Carlo pass, and `predict` with sampling off) are
        tempered, training is not. Set it to `None` to remove it.
        """
        return None if self._calibration is None else dict(self._calibration)

    @calibration.setter
    def calibration(self, value):
        self._calibration = calibration_lib.check_calibration(value)
        self.predict_function = None
        self.test_function = None

    def call(self, inputs, training=None):
        # Layers reading one input (attention's query and value) share x @ A.
        with self.projection_registry.sharing_products():
            outputs = self.base_model(inputs, training=training)
        if self._calibration is not None and not training:
            outputs = calibration_lib.apply_temperature(
                outputs,
                self._calibration["temperature"],
                self._calibration["from_logits"],
            )
        return outputs

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        if self.kl_weight > 0 and training:
            ids = set()
            for layer in self.adapted_layers.values():
                ids.update(layer._loss_ids)
                ids.update(id(t) for t in layer._losses)
            terms = [t for t in self.losses if id(t) in ids]
            if terms:
                kl = ops.divide(ops.sum(ops.stack(terms)), self.kl_weight)
                self.kl_tracker.update_state(kl)
        return loss

    def check_finite(self):
        """Raises `ValueError` if any adapter vector holds NaN or infinity.

        `predict` and `evaluate` call it first, so a diverged fine-tune gives
        a clear error instead of silent NaN predictions.

        Raises:
            ValueError: Naming the first broken vectors.

        Example:

        >>> import numpy as np
        >>> import keras_pvera
        >>> base = keras.Sequential([keras.Input((4,)),
        ...                          keras.layers.Dense(8, name="hidden"),
        ...                          keras.layers.Dense(2, name="head")])
        >>> model = keras_pvera.apply(base, rank=2, target=["hidden"])
        >>> model.check_finite()  # fine: returns None
        >>> _ = model.adapted_layers["hidden"].lambda_b.assign(np.full(8, np.nan))
        >>> model.check_finite()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: PVeRA weights hold NaN or infinity: ['hidden/pvera_lambda_b']...
        """
        bad = []
        for path, layer in self.adapted_layers.items():
            for weight in (layer.lambda_d, layer.lambda_b):
                if not np.all(np.isfinite(ops.convert_to_numpy(weight))):
                    bad.append(f"{path}/{weight.name}")
        if bad:
            raise ValueError(
                f"PVeRA weights hold NaN or infinity: {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}. Training diverged: lower "
                "the learning rate or use gradient clipping (for example "
                "`optimizer=keras.optimizers.AdamW(1e-3, clipnorm=1.0)`), "
                "then train again from the base model."
            )

    def fit(self, *args, **kwargs):
        history = super().fit(*args, **kwargs)
        try:
            self.check_finite()
        except ValueError as e:
            warnings.warn(str(e), stacklevel=2)
        return history

    def predict(self, *args, **kwargs):
        self.check_finite()
        return super().predict(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        self.check_finite()
        logs = super().evaluate(*args, **kwargs)
        if isinstance(logs, dict):
            # KL is a training term (evaluation runs the mean path): drop the
            # tracker's empty reading, which fit would log as val_kl_loss 0.
            logs.pop("kl_loss", None)
        return logs

    def parameter_counts(self):
        """Counts the parameters, each weight once.

        Returns:
            A tuple `(trainable, total)` of integers.

        Example:

        >>> import keras_pvera
        >>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
        ...                          keras.layers.Dense(3)])
        >>> keras_pvera.apply(base, rank=4, target=[base.layers[0].name]
        ...                   ).parameter_counts()  # lambdas 2 * 4 + 16
        (24, 347)
        """
        trainable = sum(int(np.prod(w.shape)) for w in self.trainable_weights)
        total = sum(int(np.prod(w.shape)) for w in self.weights)
        return trainable, total

    def pvera_summary(self):
        """A text table of the adapted layers and parameter counts.

        Returns:
            A string; `summary()` prints it after Keras' own summary.

        Example:

        >>> import keras_pvera
        >>> base = keras.Sequential([keras.Input((8,)),
        ...                          keras.layers.Dense(16, name="hidden"),
        ...                          keras.layers.Dense(3, name="head")])
        >>> print(keras_pvera.apply(base, rank=4, target=["hidden"]
        ...                         ).pvera_summary())  # doctest: +ELLIPSIS
        PVeRA: rank=4, seed=0, alpha=1, ...
        Shared projections: A (8, 8), B (16, 4)
        1 adapted layers:
          hidden  Dense            8 -> 16     trainable 24
        trainable params: 24 || all params: 347 || trainable%: 6.9164
        """
        trainable, total = self.parameter_counts()
        lines = [
            f"PVeRA: rank={self.rank}, seed={self.seed}, alpha={self.alpha:g}, "
            f"d_initial={self.d_initial:g}, dropout={self.dropout:g}, "
            f"kl_weight={self.kl_weight:g}, "
            f"sample_at_inference={self.sample_at_inference}",
            f"Shared projections: A "
            f"{tuple(self.projection_registry.projection_a.shape)}"
            f", B {tuple(self.projection_registry.projection_b.shape)}"
            f"{'' if self.save_projection else ' (not saved; regenerated from seed)'}",
            f"{len(self.adapted_layers)} adapted layers:",
        ]
        width = max(len(p) for p in self.adapted_layers)
        for path, layer in self.adapted_layers.items():
            lines.append(
                f"  {path:<{width}}  {type(layer.base_layer).__name__:<11} "
                f"{layer.in_dim:>6} -> {layer.out_dim:<6} "
                f"trainable {2 * layer.rank + layer.out_dim:,}"
            )
        if self.trainable_paths:
            lines.append(f"Trained in full: {', '.join(self.trainable_paths)}")
        lines.append(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}"
        )
        return "\n".join(lines)

    def print_trainable_parameters(self):
        """Prints trainable and total parameter counts, as PEFT does.

        Example:

        >>> import keras_pvera
        >>> base = keras.Sequential([keras.Input((8,)),
        ...                          keras.layers.Dense(16, name="hidden"),
        ...                          keras.layers.Dense(3, name="head")])
        >>> keras_pvera.apply(base, rank=4, target=["hidden"]
        ...                   ).print_trainable_parameters()
        trainable params: 24 || all params: 347 || trainable%: 6.9164
        """
        print(self.pvera_summary().splitlines()[-1])

    def summary(self, *args, print_fn=None, **kwargs):
        super().summary(*args, print_fn=print_fn, **kwargs)
        (print_fn or print)(self.pvera_summary())

    def get_config(self):
        if "error" in self._base_model_config:
            raise ValueError(
                "The base model could not be serialized, so this PVeRA model "
                "cannot be saved as .keras: "
                f"{self._base_model_config['error']}. Give the base model a "
                "complete `get_config`, or save the adapter weights only."
            )
        return {
            "name": self.name,
            "trainable": self.trainable,
            "base_model_config": self._base_model_config,
            **self.pvera_config,
            "calibration": self.calibration,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base_model = keras.saving.deserialize_keras_object(config["base_model_config"])
        return cls(base_model, **config)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Refuses: quantize the base model before `keras_pvera.apply`.

        The saved file rebuilds the base model from its configuration as it
        was when PVeRA was applied, so weights quantized afterwards would not
        load back; and the adapters are set up for the base layers' mode.

        Raises:
            ValueError: Always, naming the order that works.
        """
        raise ValueError(
            "Quantize the base model before keras_pvera.apply, not the "
            "adapted model: `base.quantize("
            f"{mode!r}); model = keras_pvera.apply(base, ...)`. The "
            "adapted model saves the base model's configuration as it was "
            "when PVeRA was applied, so quantizing afterwards would not "
            "round-trip."
        )

    def predict_with_uncertainty(self, x, n=30, **kwargs):
        """Monte Carlo prediction: `n` sampled passes and their statistics.

        The same as `keras_pvera.predict_with_uncertainty(self, x, n, ...)`;
        see there for the keyword arguments (`batch_size`, `level`, `seed`,
        `return_samples`, `verbose`).

        Args:
            x: Inputs, as for `model.predict`.
            n: Number of Monte Carlo passes.
            **kwargs: `batch_size`, `level`, `seed`, `return_samples`,
                `verbose`.

        Returns:
            An `UncertaintyResult`.

        Raises:
            ValueError: As `keras_pvera.predict_with_uncertainty`.

        Example:

        >>> import keras_pvera
        >>> import numpy as np
        >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                          keras.layers.Dense(2, activation="softmax")])
        >>> model = keras_pvera.apply(base, rank=4)
        >>> result = model.predict_with_uncertainty(np.ones((3, 4)), n=4,
        ...                                         seed=0, verbose=0)
        >>> result.n, result.mean.shape, result.lower.shape
        (4, (3, 2), (3, 2))
        """
        # Imported when used: the uncertainty tools are optional to the core.
        from keras_pvera.uncertainty import predict_with_uncertainty

        return predict_with_uncertainty(self, x, n=n, **kwargs)


def _layer_at(layers, path):
    if path not in layers:
        raise ValueError(
            f"The model has no layer at path {path!r}. Available: {sorted(layers)[:20]}"
        )
    return layers[path]


def _freeze(model, adapters, trainable_layers):
    """Freezes every weight of `model` but the adapters' and `trainable_layers`'.

    Layers with nothing trainable inside are set `trainable=False` (so that,
    for example, BatchNormalization runs in inference mode); layers that
    contain adapters keep `trainable=True` with their own weights frozen.

    A failure part-way undoes what was done and re-raises.
    """
    keep = set()
    for layer in adapters:
        keep.update((id(layer.lambda_d), id(layer.lambda_b)))
    for layer in trainable_layers:
        keep.update(id(w) for w in layer.weights)
    undo = []
    try:
        for _, layer in model_surgery.iter_layers(model):
            if layer.trainable and not any(id(w) in keep for w in layer.weights):
                layer.trainable = False
                undo.append(lambda layer=layer: setattr(layer, "trainable", True))
        for weight in model.weights:
            if weight.trainable and id(weight) not in keep:
                weight.trainable = False
                undo.append(lambda w=weight: setattr(w, "trainable", True))
    except Exception:
        for step in reversed(undo):
            step()
        raise
