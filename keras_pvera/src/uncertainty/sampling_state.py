"""The sampling state of a model's adapted layers during a Monte Carlo run.

A run switches sampling at inference on in the layers that sample
(`sampling_switched`), starts their noise generators from states derived
from its seed (`noise_states`), and gives both back afterwards, dropping
the compiled predict functions that baked them in
(`sampling_at_inference`). `sampling_off` does the same with sampling off,
for the mean prediction. `predict_with_uncertainty`,
`generate_with_uncertainty`, `evaluate_uncertainty` and
`export_with_uncertainty` all set the sampling state through these.
"""

import contextlib

import numpy as np
from keras import ops

from keras_pvera.src.layers.seeds import seed_generator_states
from keras_pvera.src.utils import keras_internals


def drop_traces(model):
    """Drops `model`'s compiled predict functions: JAX and TensorFlow bake
    a sampling switch, a noise state and a repetition count into them."""
    keras_internals.drop_compiled_functions(model)


@contextlib.contextmanager
def sampling_switched(adapters, flags, adapter_names=None):
    """Switches sampling at inference on or off (per layer: `flags`) for
    the adapters that run (`adapter_names`, or each layer's active ones),
    and restores the layers' switches after. Python state only: a function
    traced within it samples where its flag is on. `flags`: one bool per
    layer, or one bool for all of them."""
    if isinstance(flags, bool):
        flags = [flags] * len(adapters)
    layer_flags = [layer.sampling_flags() for layer in adapters]
    try:
        for layer, flag in zip(adapters, flags, strict=True):
            names = layer.active_names if adapter_names is None else adapter_names
            held = [name for name in names if name in layer.adapter_vectors]
            layer.set_sampling_flags(dict.fromkeys(held, flag))
        yield
    finally:
        for layer, saved in zip(adapters, layer_flags, strict=True):
            layer.set_sampling_flags(saved)


def noise_states(noise_streams, adapters, seed):
    """The states the noise generators of `adapters` start from under `seed`.

    Each layer's state is derived from `seed` and the layer's place among
    `noise_streams` (all the model's PVeRA layers, `SampledModel`):
    independent between layers, and the same whichever adapters run.
    """
    if not adapters:  # Every row picked the base model: no noise.
        return []
    places = {id(layer): place for place, layer in enumerate(noise_streams)}
    places = [places[id(layer)] for layer in adapters]
    dtype = ops.convert_to_numpy(adapters[0].seed_generator.state.value).dtype
    states = seed_generator_states(seed, max(places) + 1, dtype)
    return [states[place] for place in places]


@contextlib.contextmanager
def sampling_at_inference(parts, adapters, seed, flags, adapter_names=None):
    """Switches sampling at inference on (`sampling_switched`), with the
    noise generators at `seed`'s states (`noise_states`), and restores
    everything after. `parts`: the model's `SampledModel`.

    Compiled predict functions are dropped on entry and exit (JAX and
    TensorFlow bake the switch into them). The generators get their
    previous states back afterwards, so the run leaves the model's own
    noise streams as they were.
    """
    model = parts.model
    generators = [layer.seed_generator for layer in adapters]
    saved_states = [np.array(ops.convert_to_numpy(g.state.value)) for g in generators]
    try:
        with sampling_switched(adapters, flags, adapter_names):
            states = noise_states(parts.noise_streams, adapters, seed)
            for generator, state in zip(generators, states, strict=True):
                generator.state.assign(state)
            drop_traces(model)
            yield
    finally:
        for generator, state in zip(generators, saved_states, strict=True):
            generator.state.assign(state)
        drop_traces(model)


@contextlib.contextmanager
def sampling_off(parts):
    """Every adapted layer of the model (`parts`, its `SampledModel`) uses
    its latent mean for the duration (`predict` gives the mean prediction,
    whatever `sample_at_inference` says), restored after, as
    `predict_with_uncertainty` restores it.

    Raises:
        ValueError: If the model has no PVeRA layers.
    """
    adapters = list(parts.active_layers().values())
    with sampling_at_inference(parts, adapters, 0, False):
        yield
