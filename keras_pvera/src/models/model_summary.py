"""What an adapted model reports about itself.

Parameter counts, the summary table, and the check that no adapter vector
has diverged. `PVeRAModel` exposes each as a method of the same name.
"""

import numpy as np
from keras import ops

from keras_pvera.src.surgery import layer_selection


class ModelSummary:
    """Mixed into `PVeRAModel`: its parameter counts, summary and checks."""

    def check_finite(self):
        """Raises `ValueError` if any adapter vector holds NaN or infinity.

        `predict` and `evaluate` call it first, so a diverged fine-tune gives
        a clear error instead of silent NaN predictions.

        Raises:
            ValueError: Naming the first broken vectors.

        Example:

        >>> import keras, numpy as np
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
        for name in self.adapter_names:
            for path, layer in self.adapter_registry.layers_of(name).items():
                for weight in layer.adapter_vectors[name].weights:
                    if not np.all(np.isfinite(ops.convert_to_numpy(weight))):
                        bad.append(f"{path}/{weight.name}")
        if bad:
            raise ValueError(
                f"PVeRA weights hold NaN or infinity: {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}. Training diverged: lower "
                "the learning rate or use gradient clipping (for example "
                "`optimizer=keras.optimizers.AdamW(1e-3, clipnorm=1.0)`), "
                "then train again from the base self."
            )

    def parameter_counts(self):
        """Counts the parameters, each weight once.

        Returns:
            A tuple `(trainable, total)` of integers.

        Example:

        >>> import keras, keras_pvera
        >>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
        ...                          keras.layers.Dense(3)])
        >>> keras_pvera.apply(base, rank=4, target=[base.layers[0].name]
        ...                   ).parameter_counts()  # lambdas 2 * 4 + 16
        (24, 347)
        """
        trainable = sum(int(np.prod(w.shape)) for w in self.trainable_weights)
        total = sum(int(np.prod(w.shape)) for w in self.weights)
        return trainable, total

    def pvera_summary(self, print_fn=None):
        """Prints a table of the adapters, the adapted layers and parameter
        counts, as Keras' `summary()` prints its own (which prints this after
        its table).

        Args:
            print_fn: The function to print with, as in Keras' `summary`:
                called once, with the table's text. `None` prints to
                standard output; `texts.append` keeps the text in a list.

        Example:

        >>> import keras, keras_pvera
        >>> base = keras.Sequential([keras.Input((8,)),
        ...                          keras.layers.Dense(16, name="hidden"),
        ...                          keras.layers.Dense(3, name="head")])
        >>> model = keras_pvera.apply(base, rank=4, target=["hidden"])
        >>> model.pvera_summary()  # doctest: +ELLIPSIS
        PVeRA adapter 'default' (active): rank=4, seed=0, alpha=1, ...
        Shared projections: A (8, 8), B (16, 4)
        1 adapted layers:
          hidden  Dense            8 -> 16     trainable 24
        trainable params: 24 || all params: 347 || trainable%: 6.9164
        >>> texts = []
        >>> model.pvera_summary(print_fn=texts.append)
        >>> texts[0].splitlines()[2]
        '1 adapted layers:'
        """
        (print_fn or print)(self._pvera_summary_text())

    def _pvera_summary_text(self):
        registry = self.projection_registry
        lines = []
        for name in self.adapter_names:
            config = self.adapter_registry.adapters[name].config
            state = "active" if name in self.active_adapters else "inactive"
            lines.append(
                f"PVeRA adapter {name!r} ({state}): rank={config.rank}, "
                f"seed={config.seed}, alpha={config.alpha:g}, "
                f"d_initial={config.d_initial:g}, dropout={config.dropout:g}, "
                f"kl_weight={config.kl_weight:g}, "
                f"sample_at_inference={config.sample_at_inference}"
            )
        unsaved = " (not saved; regenerated from seed)"
        lines.append(
            f"Shared projections: A {tuple(registry.projection_a.shape)}, "
            f"B {tuple(registry.projection_b.shape)}"
            f"{'' if registry.save_projection else unsaved}"
        )
        if self.merged_adapters:
            merged = ", ".join(repr(n) for n in self.merged_adapters)
            lines.append(f"Merged into the kernels: {merged}")
        layers = self.adapted_layers  # {} with no active adapter
        lines.append(f"{len(layers)} adapted layers:")
        width = max((len(p) for p in layers), default=0)
        for path, layer in layers.items():
            lines.append(
                f"  {path:<{width}}  {type(layer.base_layer).__name__:<11} "
                f"{layer.in_dim:>6} -> {layer.out_dim:<6} "
                f"trainable {2 * layer.rank + layer.out_dim:,}"
            )
        if self.trainable_paths:
            in_full = layer_selection.layers_at(self.base_model, self.trainable_paths)
            counts = [
                f"{path} ({sum(int(np.prod(w.shape)) for w in seen.weights):,})"
                for path, layer in in_full.items()
                for seen in [layer_selection.seen_as(layer)]
            ]
            lines.append(f"Trained in full: {', '.join(counts)}")
        lines.append(self._parameter_line())
        return "\n".join(lines)

    def _parameter_line(self):
        trainable, total = self.parameter_counts()
        return (
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}"
        )

    def print_trainable_parameters(self):
        """Prints trainable and total parameter counts, as PEFT does.

        Example:

        >>> import keras, keras_pvera
        >>> base = keras.Sequential([keras.Input((8,)),
        ...                          keras.layers.Dense(16, name="hidden"),
        ...                          keras.layers.Dense(3, name="head")])
        >>> keras_pvera.apply(base, rank=4, target=["hidden"]
        ...                   ).print_trainable_parameters()
        trainable params: 24 || all params: 347 || trainable%: 6.9164
        """
        print(self._parameter_line())
