"""An adapted model exports as Keras models do, and its uncertainty serves.

`model.export` writes the adapters' mean, and the artefact, run by ONNX
Runtime (torch backend) or loaded with `tf.saved_model.load` (TensorFlow
and JAX), computes what `predict` does. `export_with_uncertainty` adds an
endpoint giving what `predict_with_uncertainty` gives with the same seed.
Each test runs the format of its backend; KerasHub tasks are in
tests/hub/test_export.py.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_pvera

# The `export` extra's readers (CI's oldest-Keras run goes without).
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

BACKEND = keras.backend.backend()
FORMAT = "onnx" if BACKEND == "torch" else "tf_saved_model"


def sequential():
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3),
        ]
    )


def functional():
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    skip = keras.layers.Dense(16)(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Add()([hidden, skip]))
    return keras.Model(inputs, outputs)


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(16, activation="relu", name="hidden")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(ops.concatenate([x, self.hidden(x)], axis=-1))


def subclassed():
    base = Subclassed()
    base(np.zeros((1, 8), "float32"))  # Keras records the input shape.
    return base


BASES = {"sequential": sequential, "functional": functional, "subclassed": subclassed}


def adapted(base, **settings):
    """`base` adapted in every layer, with vectors that move its outputs."""
    model = keras_pvera.apply(base, rank=4, target="all", **settings)
    rng = np.random.default_rng(0)
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(rng.normal(size=layer.out_dim).astype("float32"))
    return model


def inputs(rows=5):
    return np.random.default_rng(1).normal(size=(rows, 8)).astype("float32")


# The other formats each backend writes (tf2onnx writes ONNX from
# TensorFlow). JAX's ONNX (jax2onnx) is left to the hand check in
# docs/serving.md: one export took 30 s there.
OTHER_FORMATS = {
    "torch": ["openvino"],
    "tensorflow": ["onnx", "openvino"],
}.get(BACKEND, [])


def path_for(tmp_path, format):
    suffix = {"onnx": ".onnx", "openvino": ".xml"}.get(format, "")
    return str(tmp_path / f"model{suffix}")


def served(path, x):
    """The exported artefact's output for `x`."""
    if path.endswith(".onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(path)
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    if path.endswith(".xml"):
        import openvino

        # OpenVINO computes in bfloat16 on CPUs that have it unless told.
        compiled = openvino.Core().compile_model(
            path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
        return compiled([x])[compiled.outputs[0]]
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    return loaded.serve(x).numpy()


@pytest.mark.parametrize("kind", sorted(BASES))
def test_an_adapted_model_exports_what_predict_gives(kind, tmp_path):
    base = BASES[kind]()
    x = inputs()
    base_outputs = base.predict(x, verbose=0)
    model = adapted(base)
    expected = model.predict(x, verbose=0)
    assert np.max(np.abs(expected - base_outputs)) > 1e-2  # The adapter acts.
    path = path_for(tmp_path, FORMAT)
    model.export(path, format=FORMAT, verbose=False)
    np.testing.assert_allclose(served(path, x), expected, rtol=0, atol=1e-5)


if OTHER_FORMATS:

    @pytest.mark.parametrize("format", OTHER_FORMATS)
    def test_the_backend_s_other_formats_serve_what_predict_gives(format, tmp_path):
        model = adapted(sequential())
        x = inputs()
        path = path_for(tmp_path, format)
        model.export(path, format=format, verbose=False)
        expected = model.predict(x, verbose=0)
        np.testing.assert_allclose(served(path, x), expected, rtol=0, atol=1e-5)


def test_a_format_the_backend_cannot_write_is_refused(tmp_path):
    model = adapted(sequential())
    refused = "tf_saved_model" if BACKEND == "torch" else "torch"
    can = "'onnx'" if BACKEND == "torch" else "'tf_saved_model'"
    path = tmp_path / "model"
    with pytest.raises(ValueError, match=f"format='{refused}'.*{can}"):
        model.export(str(path), format=refused)
    assert not path.exists()


def test_a_model_that_samples_is_refused(tmp_path):
    model = adapted(sequential(), sample_at_inference=True)
    path = tmp_path / "model"
    with pytest.raises(ValueError, match="export_with_uncertainty"):
        model.export(str(path), format=FORMAT)
    assert not path.exists()


def test_the_served_uncertainty_is_predict_with_uncertainty(tmp_path):
    # Sampling at inference on: `serve` is the mean all the same.
    model = adapted(sequential(), d_initial=1.0, sample_at_inference=True)
    x, n, seed = inputs(), 5, 3
    path = str(tmp_path / "model")
    if BACKEND == "torch":  # Torch's exporters cannot hold the noise.
        with pytest.raises(ValueError, match="TensorFlow and JAX"):
            keras_pvera.export_with_uncertainty(model, path, n=n, seed=seed)
        assert not (tmp_path / "model").exists()
        return
    keras_pvera.export_with_uncertainty(model, path, n=n, seed=seed, verbose=False)
    expected = keras_pvera.predict_with_uncertainty(
        model, x, n=n, seed=seed, batch_size=n * len(x), verbose=0
    )
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    result = loaded.serve_uncertainty(x)
    for name in ("mean", "std", "lower", "upper"):
        np.testing.assert_allclose(
            result[name].numpy(), getattr(expected, name), rtol=0, atol=1e-5
        )
    assert np.min(expected.std) > 1e-3  # The passes differ.
    again = loaded.serve_uncertainty(x)  # The same noise at every call.
    np.testing.assert_array_equal(again["mean"].numpy(), result["mean"].numpy())
    model.sample_at_inference = False
    np.testing.assert_allclose(
        loaded.serve(x).numpy(), model.predict(x, verbose=0), rtol=0, atol=1e-5
    )
