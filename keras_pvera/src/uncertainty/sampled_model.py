"""What a Monte Carlo run needs to know of a model, asked once per call.

A run asks a model a few questions: which layers sample, in what order
their noise streams are numbered, whether each output is logits or
probabilities, which KerasHub task (and preprocessor) it adapts, and, for a
model made by `keras_pvera.apply`, its calibration and the layers of its
named adapters. `read_model(model)` asks them once and returns the answers
as a `SampledModel` record, which the run (`monte_carlo`, `generation`,
`evaluation`, `diagnosis`, `temperature_scaling`) reads from then on.

A `PVeRAModel` answers for itself (its `sampled_model` method); any other
Keras model holding `PVeRADense` layers is read from its layers.

Example:

>>> import keras
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> parts = read_model(model)
>>> parts.adapted_layers, parts.output_kinds, parts.named_adapters
({}, [True], False)
"""

import dataclasses

import keras

from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.uncertainty import output_kinds


@dataclasses.dataclass(frozen=True)
class SampledModel:
    """The answers a Monte Carlo run needs from a model.

    Attributes:
        model: The model, to call.
        adapted_layers: `{path: PVeRADense}` of the layers the active
            adapters adapt, in order.
        noise_streams: Every `PVeRADense` layer of the model, in a fixed
            order: a layer's place here picks its noise stream under a
            run's seed, the same whichever adapters run.
        output_kinds: Per output, `True` (logits), `False` (probabilities)
            or `None` (unknown); `None` when the outputs cannot be read
            (see `output_kinds.output_kinds`).
        task: The KerasHub task the model adapts (its `preprocessor` reads
            raw inputs), or `None`.
        calibration: The temperature scaling, or `None`.
        layers_of: For a model made by `keras_pvera.apply`, a function
            `(adapter names) -> {path: PVeRADense}` of the layers those
            adapters adapt; `None` for another model.
    """

    model: keras.Model
    adapted_layers: dict
    noise_streams: tuple
    output_kinds: list = None
    task: keras.Model = None
    calibration: dict = None
    layers_of: object = None

    @property
    def named_adapters(self):
        """Whether the model holds named adapters (made by `apply`): it can
        run each example's own adapter (`adapters_by_row`), checks its
        adapter weights (`check_finite`), and runs the layers before its
        first sampling layer once per batch (`shared_prefix`)."""
        return self.layers_of is not None

    def active_layers(self):
        """`adapted_layers`, or a `ValueError` if the model has none.

        Raises:
            ValueError: If no layer of the model runs a PVeRA adapter.
        """
        if not self.adapted_layers:
            name = getattr(self.model, "name", self.model)
            raise ValueError(
                f"Model {name!r} has no PVeRA layers, so its passes cannot "
                "differ. Adapt it first: `model = keras_pvera.apply(model, "
                "...)`."
            )
        return self.adapted_layers


def read_model(model):
    """What a Monte Carlo run needs of `model`, as a `SampledModel`.

    Args:
        model: A model made by `keras_pvera.apply` (it answers with its
            `sampled_model()`), or any Keras model (read from its layers).

    Returns:
        A `SampledModel`.
    """
    # Looked up on the class: a `PVeRAModel` hands other missing attributes
    # on to the task it adapts.
    if callable(getattr(type(model), "sampled_model", None)):
        return model.sampled_model()
    found = layer_walk.pvera_layers(model)
    return SampledModel(
        model=model,
        adapted_layers={
            path: layer for path, layer in found if layer.active_adapter is not None
        },
        noise_streams=tuple(layer for _, layer in found),
        output_kinds=output_kinds.output_kinds(model),
    )
