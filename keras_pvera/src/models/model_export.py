"""`PVeRAModel.export`: an adapted model as a serving artefact.

Keras' `model.export` writes a model's forward pass (`call`) for ONNX
Runtime, TensorFlow Serving, LiteRT, OpenVINO or `torch.export`. An adapted
model is a subclassed model whose input signature Keras cannot find by
itself; it is its base model's, which Keras can (the inputs of a Functional
or Sequential model, the shapes a subclassed model was first called with).
The export holds the adapters' mean: sampling at inference is refused
(`keras_pvera.export_with_uncertainty` serves the Monte Carlo statistics).
"""

import keras
from keras import ops

from keras_pvera.src.uncertainty import monte_carlo
from keras_pvera.src.uncertainty import sampling_state
from keras_pvera.src.uncertainty import shared_prefix
from keras_pvera.src.uncertainty.sampled_model import read_model
from keras_pvera.src.uncertainty.statistics import check_level
from keras_pvera.src.utils import checks
from keras_pvera.src.utils import keras_internals

# Keras 3's export formats and the backends that can write each, as
# `keras.Model.export` checks them, except two that Keras 3.15's `export`
# fails to write for any model: a SavedModel from torch (`torch.export` is
# given dynamic shapes that do not match its inputs) and OpenVINO from JAX
# (OpenVINO 2026.4 has no conversion for JAX's `XlaCallModule`).
FORMAT_BACKENDS = {
    "tf_saved_model": ("tensorflow", "jax"),
    "onnx": ("tensorflow", "jax", "torch"),
    "openvino": ("tensorflow", "torch"),
    "litert": ("tensorflow", "torch"),
    "torch": ("torch",),
}


def formats_of(backend):
    """The export formats Keras writes on `backend`."""
    return [name for name, backends in FORMAT_BACKENDS.items() if backend in backends]


def check_format(format):
    """Raises a `ValueError` for a format this backend cannot write."""
    backend = keras.backend.backend()
    if backend not in FORMAT_BACKENDS.get(format, ()):
        raise ValueError(
            f"An adapted model cannot be exported to format={format!r} on "
            f"the {backend} backend (nor can a plain Keras model); formats "
            f"there: {formats_of(backend)}. Received: format={format!r}"
        )


def _input_signature(model):
    """The input signature of an adapted model: its base model's.

    Raises:
        ValueError: For a subclassed base model that was built without
            being called (Keras records the input shapes at the first
            call), saying how to give the signature.
    """
    try:
        return keras_internals.input_signature(model.base_model)
    except ValueError as e:
        raise ValueError(
            f"Cannot find the input signature of {model.base_model.name!r} "
            f"({e}). Call the model once on a batch "
            "(`model.predict(x)`), or pass `input_signature=[keras.InputSpec("
            "shape=(None, ...), dtype=...)]` to `export`."
        ) from e


def export(model, filepath, format, verbose, signature, **kwargs):
    """`keras.Model.export` for the adapted `model`; see `PVeRAModel.export`."""
    check_format(format)
    if model.sample_at_inference:
        raise ValueError(
            "An exported model serves the adapters' mean, but this model "
            "samples at inference. Set `model.sample_at_inference = False` "
            "to export the mean, or serve the Monte Carlo statistics with "
            "`keras_pvera.export_with_uncertainty(model, filepath, n=..., "
            "seed=...)`."
        )
    if signature is None:
        signature = _input_signature(model)
    # Variables added after the model was built must be torch parameters.
    keras_internals.track_torch_parameters(model)
    keras.Model.export(
        model,
        filepath,
        format=format,
        verbose=verbose,
        input_signature=signature,
        **kwargs,
    )


def export_with_uncertainty(
    model,
    filepath,
    n=30,
    *,
    seed,
    level=0.95,
    input_signature=None,
    verbose=None,
):
    """Exports an adapted model with a Monte Carlo endpoint, as a SavedModel.

    The SavedModel has two endpoints: `serve`, what `model.export` writes
    (the adapters' mean), and `serve_uncertainty`, which makes `n` sampled
    passes of its batch, with the noise of `seed` (the same at every
    call), and returns a dict of `mean`, `std`, `lower` and `upper`, as
    `keras_pvera.predict_with_uncertainty` computes them: for a batch `x`,
    they equal `predict_with_uncertainty(model, x, n=n, seed=seed,
    level=level, batch_size=n * len(x))` on the backend that exported it
    (one call for the whole batch; other `batch_size`s draw the same
    distribution with other noise). Each output is shaped like `predict`'s
    (a dict or list of them for a model with several outputs).

    Sampling needs the noise generators' state inside the artefact: a
    SavedModel holds it on the TensorFlow and JAX backends. Torch's
    exporters cannot (ONNX fails on the `torch.Generator` the noise is
    drawn from, `torch.export` fails too), so the torch backend is
    refused. A served call resets the state to `seed`'s, so concurrent
    calls on one loaded model must not overlap.

    Args:
        model: A model made by `keras_pvera.apply`.
        filepath: The SavedModel's folder.
        n: Number of Monte Carlo passes, a positive integer.
        seed: A non-negative integer: the noise of every served call.
        level: Level of the `lower`/`upper` interval, in (0, 1).
        input_signature: As for `keras.Model.export`; `None`: the base
            model's inputs.
        verbose: As for `keras.export.ExportArchive.write_out`.

    Raises:
        ValueError: On the torch backend, for a bad `n`, `seed` or `level`,
            adapter weights holding NaN or infinity, or a model that is not
            adapted.

    Example:

    ```python
    keras_pvera.export_with_uncertainty(model, "served", n=30, seed=0)
    served = tf.saved_model.load("served")
    result = served.serve_uncertainty(x)  # {"mean", "std", "lower", "upper"}
    ```
    """
    _check_backend()
    parts = read_model(model)
    if not parts.named_adapters:
        raise ValueError(
            "export_with_uncertainty exports a model made by "
            f"`keras_pvera.apply`; received {type(model).__name__}."
        )
    n = checks.checked_integer(n, "n")
    seed = _fixed_seed(seed)
    level = check_level(level)
    model.check_finite()
    if input_signature is None:
        input_signature = _input_signature(model)
    serve, serve_uncertainty = _endpoints(parts, n, seed, level)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=input_signature)
    archive.add_endpoint(
        "serve_uncertainty", serve_uncertainty, input_signature=input_signature
    )
    archive.write_out(str(filepath), verbose=verbose)


def _check_backend():
    """Refuses a backend whose exporters cannot hold sampling (torch)."""
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise ValueError(
            "export_with_uncertainty writes a TensorFlow SavedModel, which "
            "holds the noise generators' state on the TensorFlow and JAX "
            f"backends only; on {backend}, the exporters (ONNX, torch.export) "
            "cannot hold sampling. Export from KERAS_BACKEND=tensorflow or "
            "jax (the adapted model loads there from its `.keras` file, or "
            "its adapter with `keras_pvera.load_adapter`), or export the mean "
            "with `model.export(...)`."
        )


def _fixed_seed(seed):
    """`seed` checked, or a `ValueError` for `None`: a served call cannot
    draw one."""
    seed = monte_carlo.check_seed(seed)
    if seed is None:
        raise ValueError(
            "export_with_uncertainty needs a fixed `seed` (a non-negative "
            "integer): the served noise is the same at every call."
        )
    return seed


def _endpoints(parts, n, seed, level):
    """`(serve, serve_uncertainty)`: the model (`parts`, its `SampledModel`)
    with its adapters at their mean, and its `n` sampled passes at
    `seed`'s noise reduced to statistics."""
    model = parts.model
    adapters = list(parts.active_layers().values())
    generators = [layer.seed_generator for layer in adapters]
    states = sampling_state.noise_states(parts.noise_streams, adapters, seed)
    holds_sampling = shared_prefix.sampling_holders(adapters)

    # Each endpoint sets the sampling switches (Python state) it is traced
    # with, whenever it is traced: off for the mean, on for the passes.
    def serve(x):
        with sampling_state.sampling_switched(adapters, False):
            return model(x, training=False)

    def serve_uncertainty(x):
        with sampling_state.sampling_switched(adapters, True):
            for generator, state in zip(generators, states, strict=True):
                generator.state.assign(state)  # The same noise at every call.
            with shared_prefix.repeating(n, holds_sampling, generators):
                outputs = model(x, training=False)
        return _statistics(outputs, n, level)

    return serve, serve_uncertainty


def _statistics(outputs, n, level):
    """`UncertaintyResult`'s `mean`, `std`, `lower` and `upper` of the `n`
    passes stacked on the batch axis of each output."""
    leaves = [
        ops.stack(ops.split(leaf, n, axis=0)) for leaf in keras.tree.flatten(outputs)
    ]
    statistics = {
        "mean": [ops.mean(s, axis=0) for s in leaves],
        "std": [ops.std(s, axis=0) for s in leaves],
        "lower": [_quantile(s, (1 - level) / 2) for s in leaves],
        "upper": [_quantile(s, (1 + level) / 2) for s in leaves],
    }
    return {
        key: keras.tree.pack_sequence_as(outputs, values)
        for key, values in statistics.items()
    }


def _quantile(samples, q):
    """`np.quantile(samples, q, axis=0)` (linear interpolation)."""
    n = int(samples.shape[0])
    ordered = ops.sort(samples, axis=0)
    position = q * (n - 1)
    below = min(int(position), n - 1)
    above = min(below + 1, n - 1)
    t = position - below
    a, b = ordered[below], ordered[above]
    # NumPy's `_lerp`: from the nearer end, as np.quantile computes it.
    if t >= 0.5:
        return ops.subtract(b, ops.multiply(ops.subtract(b, a), 1 - t))
    return ops.add(a, ops.multiply(ops.subtract(b, a), t))
