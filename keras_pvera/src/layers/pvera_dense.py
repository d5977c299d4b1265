"""`PVeRADense`: the PVeRA adapter on a frozen `Dense` or `EinsumDense` layer.

A layer holding named adapters over its base layer's linear map.
`A` `(2r, in_max)` and `B` `(out_max, r)` are frozen random matrices
shared by every adapted layer (`ProjectionRegistry`); `lambda_d` `(2r,)`
and `lambda_b` `(out,)` are the layer's trainable vectors; `eps ~ N(0, 1)`
is drawn for every element of `mu`:

    h      = lambda_d * (dropout(x) @ A[:, :in].T)          # (..., 2r)
    mu     = h[..., :r]
    logvar = h[..., r:]
    logvar = minimum(logvar, max_log_variance)              # when bounded
    z      = mu + eps * exp(0.5 * logvar)                    # when sampling
    z      = mu                                              # otherwise
    y      = act(x @ W + b + alpha * lambda_b * (z @ B[:out, :].T))

    KL     = mean(-0.5 * (1 + logvar - mu**2 - exp(logvar)))   # divergence.py

The map (`linear_map.py`: `Dense`, `EinsumDense`; `convolution_map.py`;
`embedding_map.py`) says what `in`, `out`, `x @ A.T` and `z @ B.T` are for
the base layer's kind.

At inference with sampling off, on a float32 kernel, the mean adapter is
folded into the kernel once per call (`kernel_delta.py`). Otherwise
(training, sampling, quantized or float16/bfloat16 bases) the adapter runs
token by token, with `lambda_d` and `lambda_b` scaling activations, so
their gradients are elementwise products, not weight-gradient matmuls.
"""

import keras
from keras import ops

from keras_pvera.src.layers import row_adapters
from keras_pvera.src.layers.adapter_dtype import adapter_dtype
from keras_pvera.src.layers.adapter_dtype import float_policy
from keras_pvera.src.layers.adapter_layer import AdapterLayer
from keras_pvera.src.layers.adapter_layer import check_adapter_name
from keras_pvera.src.layers.adapter_vectors import AdapterVectors
from keras_pvera.src.layers.divergence import bound_log_variance
from keras_pvera.src.layers.divergence import kl_divergence
from keras_pvera.src.layers.kernel_delta import KernelDelta
from keras_pvera.src.layers.linear_map import check_quantization_mode
from keras_pvera.src.layers.linear_map import linear_equation_of
from keras_pvera.src.layers.linear_map import unsupported_reason
from keras_pvera.src.layers.projections import ProjectionRegistry
from keras_pvera.src.layers.pvera_config import PVeRAConfig
from keras_pvera.src.layers.pvera_config import split_settings
from keras_pvera.src.layers.seeds import derive_seed
from keras_pvera.src.layers.seeds import noise_seed_of
from keras_pvera.src.utils import keras_internals


@keras.saving.register_keras_serializable(package="keras_pvera")
class PVeRADense(row_adapters.RowPath, KernelDelta, AdapterLayer):
    """PVeRA adapter around a frozen `Dense` or `EinsumDense` layer.

    The wrapped layer is frozen. Two vectors train: `lambda_d` (size
    `2 * rank`) and `lambda_b` (size `out`). The frozen projections come from
    a `ProjectionRegistry`, shared by every adapted layer of a model when
    `keras_pvera.apply` builds them; a standalone `PVeRADense` makes its own.

    While training, the latent code is sampled; at inference the mean is used
    unless `sample_at_inference` is on. `lambda_b` starts at zero, so the
    adapted layer starts equal to the base layer. The base layer's activation
    moves to this layer, so the adapter is added before it.

    A layer holds named adapters (`add_adapter`; `AdapterLayer` keeps which
    are active, enabled and merged); the active ones run, their outputs
    adding up. With none active or adapters disabled, the layer computes the
    base layer's output (merged deltas taken out on the fly).

    Args:
        base_layer: A `keras.layers.Dense` or `keras.layers.EinsumDense`.
        config: A `PVeRAConfig` for the first adapter (its `seed` seeds the
            projections when this layer makes its own); `None` for the
            defaults.
        projection_registry: A shared `ProjectionRegistry`, or `None` to make
            one sized for this layer.
        activation: The activation applied after the adapter; `None` takes
            the base layer's (which is then removed from the base layer).
        adapter_name: The first adapter's name.
        noise_seed: The seed of this layer's sampling noise and input
            dropout (one stream per layer, whichever adapter is active);
            `None` takes `config.generator_seed`, or `config.seed` when
            that is `None`. `keras_pvera.apply` gives each layer its own,
            derived from that seed and the layer's index.
        **kwargs: PVeRA settings by name (`rank`, `alpha`, `d_initial`,
            `dropout`, `kl_weight`, `sample_at_inference`, `seed`,
            `save_projection`; they override `config`'s), and base layer
            keyword arguments such as `name`.

    Raises:
        TypeError: If `base_layer` is not a `Dense` or `EinsumDense`.
        ValueError: For a bad `rank`, `dropout` or other setting, an einsum
            equation whose kernel axes are not a plain linear map, a layer
            that does not fit `projection_registry`, or a quantization mode
            other than int8, float8, int4, gptq and awq.

    Example:

    >>> import numpy as np
    >>> layer = PVeRADense(keras.layers.Dense(4), rank=8)
    >>> tuple(layer(np.ones((2, 3))).shape)
    (2, 4)
    >>> [w.name for w in layer.trainable_weights]
    ['pvera_lambda_d', 'pvera_lambda_b']
    """

    def wrapped_layer(self):
        """The base layer: inputs and masks are checked as it checks them."""
        return self.base_layer

    def __init__(
        self,
        base_layer,
        config=None,
        projection_registry=None,
        activation=None,
        adapter_name="default",
        noise_seed=None,
        **kwargs,
    ):
        self._check_base_layer(base_layer)
        settings, kwargs = split_settings(kwargs)
        config = PVeRAConfig.from_settings(config, **settings)
        check_adapter_name(adapter_name)
        kwargs.setdefault("name", base_layer.name)
        kwargs["dtype"] = float_policy(kwargs.get("dtype", base_layer.dtype_policy))
        super().__init__(**kwargs)
        self.adapter_dtype = adapter_dtype(self)
        # Variables are named beside the base layer's own, e.g.
        # "encoder/query/pvera_lambda_d" next to "encoder/query/kernel".
        keras_internals.set_parent_path(self, keras_internals.parent_path(base_layer))
        self.base_layer = base_layer
        self.projection_registry = projection_registry
        # The adapter is added before the activation: take it from the base.
        # (An Embedding has no activation.)
        if activation is None and hasattr(base_layer, "activation"):
            activation = base_layer.activation
            base_layer.activation = keras.activations.linear
        activation = keras.activations.get(activation)
        if activation is keras.activations.linear:
            activation = None
        self.activation = activation
        self.noise_seed = noise_seed_of(config, noise_seed)
        # Dropout and noise draw from distinct streams, in this layer's dtype.
        self.dropout_layer = keras.layers.Dropout(
            config.dropout,
            seed=derive_seed(self.noise_seed, 1),
            dtype=self.dtype_policy,
        )
        self.seed_generator = keras.random.SeedGenerator(self.noise_seed)
        self.adapter_vectors = {adapter_name: AdapterVectors(config)}
        self.active_names = (adapter_name,)
        self.base_layer.trainable = False
        if base_layer.built:
            self.build(None)

    def _check_base_layer(self, base_layer):
        """Raises `TypeError` unless this class adapts `base_layer`."""
        reason = unsupported_reason(base_layer)
        if reason is None and isinstance(base_layer, keras.layers.Embedding):
            reason = (
                f"Layer {base_layer.name!r} is an Embedding: wrap it in "
                "a PVeRAEmbedding (keras_pvera.apply does)."
            )
        if reason is not None:
            raise TypeError(f"{reason} Received: base_layer={base_layer!r}")

    def build(self, input_shape):
        if not self.base_layer.built:
            self.base_layer.build(input_shape)
        check_quantization_mode(self.base_layer)
        self.linear = linear_equation_of(self.base_layer)
        if self.projection_registry is None:
            first = next(iter(self.adapter_vectors.values())).config
            self.projection_registry = ProjectionRegistry(
                rank=first.rank,
                in_max=self.linear.in_dim,
                out_max=self.linear.out_dim,
                seed=first.seed,
                save_projection=first.save_projection,
                name="projection_registry",
            )
        for name, vectors in self.adapter_vectors.items():
            self._make_vectors(name, vectors)
        self.built = True

    def _make_vectors(self, name, vectors):
        # The "default" adapter's vectors keep the names they had before
        # layers held several adapters; others carry their adapter's name.
        suffix = "" if name == "default" else f"_{name}"
        vectors.lambda_d = self.add_weight(
            name=f"pvera_lambda_d{suffix}",
            shape=(2 * vectors.config.rank,),
            initializer=keras.initializers.Constant(vectors.config.d_initial),
            trainable=True,
        )
        vectors.lambda_b = self.add_weight(
            name=f"pvera_lambda_b{suffix}",
            shape=(self.linear.out_dim,),
            initializer="zeros",
            trainable=True,
        )
        self._apply_trainability()

    def add_adapter(self, adapter_name, config):
        """Adds a named adapter (not active until `set_active_adapter`).

        Args:
            adapter_name: A new name (a non-empty string).
            config: Its `PVeRAConfig`.

        Raises:
            ValueError: If the name exists, or the layer is merged.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.adapter_vectors:
            raise ValueError(
                f"Layer {self.name!r} already has an adapter named "
                f"{adapter_name!r}. Adapters: {list(self.adapter_vectors)}"
            )
        self._check_not_merged("add an adapter")
        vectors = AdapterVectors(config)
        self.adapter_vectors[adapter_name] = vectors
        if self.built:
            with keras_internals.unlocked(self):
                self._make_vectors(adapter_name, vectors)

    def delete_adapter(self, adapter_name):
        """Removes a named adapter and its variables.

        Args:
            adapter_name: One of `adapter_names`.

        Raises:
            ValueError: If there is no such adapter, or it is merged.
        """
        vectors = self._vectors_named(adapter_name)
        if adapter_name in self.merged_names:
            raise ValueError(
                f"Cannot delete adapter {adapter_name!r} while it is merged "
                f"into the kernel of layer {self.name!r}. Call "
                "`model.unmerge_adapter()` first."
            )
        # A fused group's shared lambda_d belongs to its first layer.
        owned = vectors.weights[1:] if vectors.shared_lambda_d else vectors.weights
        for variable in owned:
            if variable is not None:
                keras_internals.untrack_variable(self, variable)
        del self.adapter_vectors[adapter_name]
        self._forget(adapter_name)

    def set_active_adapter(self, adapter_name):
        """As `AdapterLayer.set_active_adapter`; the input dropout then runs
        at the (first) active adapter's rate."""
        super().set_active_adapter(adapter_name)
        if self.active_names:
            config = self.adapter_vectors[self.active_names[0]].config
            self.dropout_layer.rate = config.dropout

    def _adapters(self):
        return self.adapter_vectors

    def _trainables_of(self, adapter_name):
        return [w for w in self.adapter_vectors[adapter_name].weights if w is not None]

    def _always_frozen(self):
        registry = self.projection_registry
        return [self.base_layer] + ([] if registry is None else [registry])

    def _vectors_named(self, adapter_name):
        if adapter_name not in self.adapter_vectors:
            raise ValueError(
                f"Layer {self.name!r} has no adapter named {adapter_name!r}. "
                f"Adapters: {list(self.adapter_vectors)}"
            )
        return self.adapter_vectors[adapter_name]

    def _active_vectors(self):
        # With several active adapters, the first one's.
        if not self.active_names:
            raise ValueError(
                f"Layer {self.name!r} has no active adapter. Adapters: "
                f"{list(self.adapter_vectors)}"
            )
        return self.adapter_vectors[self.active_names[0]]

    @property
    def config(self):
        """The active adapter's `PVeRAConfig` (the first's, if several)."""
        return self._active_vectors().config

    @property
    def lambda_d(self):
        """The active adapter's `lambda_d` variable, shape `(2 * rank,)`."""
        return self._active_vectors().lambda_d

    @property
    def lambda_b(self):
        """The active adapter's `lambda_b` variable, shape `(out,)`."""
        return self._active_vectors().lambda_b

    @property
    def rank(self):
        """The active adapter's rank (its other settings: `config`)."""
        return self.config.rank

    @property
    def sample_at_inference(self):
        """Whether inference samples the active adapters' latent codes."""
        self._active_vectors()
        return any(
            self.adapter_vectors[n].config.sample_at_inference
            for n in self.active_names
        )

    @sample_at_inference.setter
    def sample_at_inference(self, value):
        self._active_vectors()
        self.set_sampling_flags({name: value for name in self.active_names})

    def sampling_flags(self):
        """`{adapter name: sample_at_inference}` for each adapter held."""
        return {
            name: vectors.config.sample_at_inference
            for name, vectors in self.adapter_vectors.items()
        }

    def set_sampling_flags(self, flags):
        """Sets `sample_at_inference` adapter by adapter.

        Args:
            flags: A dict `{adapter name: bool}` of adapters this layer holds.
        """
        for name, value in flags.items():
            vectors = self._vectors_named(name)
            vectors.config = vectors.config.replace(sample_at_inference=bool(value))

    @property
    def in_dim(self):
        """Size of the adapted layer's input (product of contracted dims)."""
        return self.linear.in_dim

    @property
    def out_dim(self):
        """Size of the adapted layer's output (product of kernel out dims)."""
        return self.linear.out_dim

    def _projections(self, vectors):
        """`(A, B)` for an adapter: `B`'s rows from its `out_offset` (a part
        of a fused map reads its own rows)."""
        return self.projection_registry.projections(
            self.in_dim, self.out_dim, vectors.out_offset
        )

    def _vectors(self, adapter):
        if adapter is None:
            return self._active_vectors()
        return self._vectors_named(adapter)

    def latent(self, inputs, training=False, adapter=None):
        """The latent mean and log-variance for `inputs`.

        `lambda_d` scales the latent activations rather than `A`, so that
        its gradient is an elementwise product, not a weight gradient.

        Args:
            inputs: The adapted layer's input.
            training: Whether dropout is active.
            adapter: The adapter's name; `None` for the active one (the
                first, if several).

        Returns:
            A tuple `(mu, logvar)`, each of shape `(..., rank)`, in float32
            whatever the compute dtype, so that `exp(logvar)` cannot
            overflow under a float16 policy. `logvar` is clipped at the
            adapter's `max_log_variance` when it has one: it is what the
            noise and the KL term use.
        """
        vectors = self._vectors(adapter)
        h = self._projected(inputs, vectors.config.dropout, training)
        h = ops.cast(ops.multiply(h, vectors.lambda_d), "float32")
        # One split, not two slices: on torch its backward is one
        # concatenation instead of two zero-filled full-size gradients.
        mu, logvar = ops.split(h, 2, axis=-1)
        return mu, bound_log_variance(logvar, vectors.config.max_log_variance)

    def _projected(self, inputs, dropout, training):
        """`x @ A.T` (before `lambda_d`), `x` after dropout at rate `dropout`."""
        # The input as the base layer sees it (rounded to a half-precision
        # compute dtype), then the adapter's dtype (float32 over such a base).
        x = ops.cast(inputs, self.compute_dtype)
        x = self._dropout(x, dropout, training)
        x = ops.cast(x, self.adapter_dtype)
        return self.projection_registry.project(x, self.linear)

    def _dropout(self, inputs, rate, training, per_position=False):
        # What `keras.layers.Dropout` does, at each adapter's own rate, from
        # the one stream of this layer's dropout layer; `per_position` drops
        # whole vectors along the last axis.
        # (A dropout layer made at rate 0 has no stream: the noise's then.)
        if not training or rate <= 0:
            return inputs
        seed = getattr(self.dropout_layer, "seed_generator", self.seed_generator)
        noise_shape = None
        if per_position:
            noise_shape = (*ops.shape(inputs)[:-1], 1)
        return keras.random.dropout(inputs, rate, noise_shape=noise_shape, seed=seed)

    def _noise(self, logvar, eps=None):
        """`eps * exp(0.5 * logvar)` in float32; `eps` drawn unless given."""
        if eps is None:
            eps = self._standard_normal(logvar)
        std = ops.exp(ops.multiply(0.5, ops.cast(logvar, "float32")))
        return ops.multiply(eps, std)

    def _standard_normal(self, like):
        """A float32 draw from this layer's noise stream, shaped as `like`."""
        return keras.random.normal(
            ops.shape(like), dtype="float32", seed=self.seed_generator
        )

    def call(self, inputs, training=None):
        base = self.base_layer
        rows = row_adapters.current()
        if rows is not None:
            return self._activate(self._per_row_path(inputs, rows, training))
        names = self.active_names if self.enabled else ()
        if self.merged_names:
            sampling = any(
                self.adapter_vectors[n].config.sample_at_inference for n in names
            )
            if training or sampling:
                self._check_not_merged("train or sample")
            if not self.enabled:
                # The base output: the merged deltas taken out on the fly.
                y = self._with_kernel(inputs, self.merged_names, ops.subtract)
                return self._activate(y)
            names = ()
        if not names:
            y = base(inputs)
        elif self._folds(training, names):
            y = self._folded_path(inputs, names)
        else:
            y = base(inputs)
            for name in names:
                y = self._latent_path(y, inputs, training, name)
        return self._activate(y)

    def _activate(self, y):
        return y if self.activation is None else self.activation(y)

    def _folds(self, training, names=None):
        """Whether this call folds the mean adapters into the kernel.

        Only for mean-mode inference on a float32 (or float64) kernel: while
        training, sampling, or on a quantized base, the adapter runs token by
        token; in float16/bfloat16 a folded delta smaller than the kernel's
        rounding step would be lost.
        """
        names = self.active_names if names is None else names
        return not (
            training
            or any(self.adapter_vectors[n].config.sample_at_inference for n in names)
            or self.base_layer.quantization_mode is not None
            or self.compute_dtype not in ("float32", "float64")
        )

    def _latent_path(self, y, inputs, training, name=None):
        """Adds one adapter (`None`: the active one) token by token
        (training, sampling, quantized or low-precision bases)."""
        vectors = self._vectors(name)
        config = vectors.config
        mu, logvar = self.latent(inputs, training=training, adapter=name)
        # A fused group has one latent: its first layer adds its KL term.
        if training and config.kl_weight > 0 and not vectors.shared_lambda_d:
            self.add_loss(config.kl_weight * kl_divergence(mu, logvar))
        sampling = bool(training) or config.sample_at_inference
        z = ops.add(mu, self._noise(logvar)) if sampling else mu
        return self._add(y, self._adapter_output(z, vectors))

    def _adapter_output(self, z, vectors):
        """The adapter's output for latent codes `z`, shaped as the base's."""
        z = ops.cast(z, self.adapter_dtype)
        _, b = self._projections(vectors)
        alpha = vectors.config.alpha
        scale = self.linear.output_scale(ops.multiply(alpha, vectors.lambda_b))
        if scale is None:
            return self.linear.expand(z, self._scaled_b(b, vectors))
        return ops.multiply(self.linear.expand(z, ops.transpose(b)), scale)

    def _add(self, y, adapter):
        """`y + adapter`, summed in the adapter's dtype, returned in `y`'s."""
        if self.adapter_dtype == self.compute_dtype:
            return ops.add(y, adapter)
        return ops.cast(ops.add(ops.cast(y, self.adapter_dtype), adapter), y.dtype)

    def compute_output_shape(self, input_shape):
        return self.base_layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "base_layer": keras.saving.serialize_keras_object(self.base_layer),
                "adapters": [
                    [name, vectors.config.to_dict()]
                    for name, vectors in self.adapter_vectors.items()
                ],
                "active_adapter": self.active_adapter,
                "adapter_enabled": self.enabled,
                "noise_seed": self.noise_seed,
                # The (possibly shared) registry's settings, so that a layer
                # rebuilt from its config reads the same projections.
                "projection_registry": (
                    None
                    if self.projection_registry is None
                    else keras.saving.serialize_keras_object(self.projection_registry)
                ),
                "activation": keras.activations.serialize(
                    self.activation or keras.activations.linear
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base_layer"] = keras.saving.deserialize_keras_object(
            config["base_layer"]
        )
        if config.get("projection_registry") is not None:
            config["projection_registry"] = keras.saving.deserialize_keras_object(
                config["projection_registry"]
            )
        # Files written before layers held several adapters carry the
        # settings at the top level: they are the one adapter "default".
        adapters = config.pop("adapters", None)
        active = config.pop("active_adapter", None)
        enabled = config.pop("adapter_enabled", True)
        if adapters is None:
            return cls(**config)
        (first_name, first), *others = adapters
        layer = cls(
            config=PVeRAConfig.from_dict(first), adapter_name=first_name, **config
        )
        for name, settings in others:
            layer.add_adapter(name, PVeRAConfig.from_dict(settings))
        layer.set_active_adapter(active)
        layer.adapter_enabled = enabled
        return layer
