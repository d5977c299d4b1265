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

from keras_pvera.src.utils import keras_internals

# Keras 3's export formats and the backends that can write each (as
# `keras.Model.export` checks them, or leaves them to fail later).
FORMAT_BACKENDS = {
    "tf_saved_model": ("tensorflow", "jax", "torch"),
    "onnx": ("tensorflow", "jax", "torch"),
    "openvino": ("tensorflow", "jax", "torch"),
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
            f"Keras cannot export to format={format!r} on the {backend} "
            f"backend; it can write {formats_of(backend)}. Received: "
            f"format={format!r}"
        )


def input_signature(model):
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
        signature = input_signature(model)
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
