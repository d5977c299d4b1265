"""PVeRA on top of a base model quantized with Keras' `model.quantize`.

Quantize the base model first, then `keras_pvera.apply`: the adapters run
beside the quantized layers (which compute their own outputs), only the
PVeRA vectors train, the quantized kernels stay as they are, and the
`.keras` file round-trips.
"""

import keras
import numpy as np
import pytest

import keras_pvera


def make_base():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    x = keras.layers.EinsumDense("ab,bc->ac", 16, activation="relu", name="mixer")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def frozen_values(model):
    """Every non-PVeRA variable: quantized kernels, scales, biases, and
    float8's scale and amax history (frozen with the layer)."""
    return {
        v.path: keras.ops.convert_to_numpy(v).copy()
        for v in model.weights
        if "pvera_lambda" not in v.path
    }


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    return x, rng.integers(0, 3, size=(64,))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_apply_and_fit_on_a_quantized_base(mode, tmp_path):
    base = make_base()
    base.quantize(mode)
    assert base.get_layer("hidden").quantization_mode == mode
    x, y = data()
    base_predictions = base.predict(x, verbose=0)

    model = keras_pvera.apply(base, rank=8, target=["hidden", "mixer"])
    np.testing.assert_array_equal(model.predict(x, verbose=0), base_predictions)
    if mode == "int8":
        kernel = model.adapted_layers["hidden"].base_layer._kernel
        assert keras.backend.standardize_dtype(kernel.dtype) == "int8"
    before = frozen_values(model)
    assert [v.path for v in model.trainable_weights] == [
        "hidden/pvera_lambda_d",
        "hidden/pvera_lambda_b",
        "mixer/pvera_lambda_d",
        "mixer/pvera_lambda_b",
    ]

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for layer in model.adapted_layers.values():
        assert np.any(keras.ops.convert_to_numpy(layer.lambda_b) != 0)  # trained
    after = frozen_values(model)
    assert sorted(after) == sorted(before)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    predictions = model.predict(x, verbose=0)
    assert np.max(np.abs(predictions - base_predictions)) > 1e-3

    model.save(tmp_path / "quantized.keras")
    loaded = keras.models.load_model(tmp_path / "quantized.keras")
    assert loaded.adapted_layers["hidden"].base_layer.quantization_mode == mode
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), predictions)
    for path, value in frozen_values(loaded).items():
        np.testing.assert_array_equal(value, after[path], err_msg=path)


def test_quantizing_after_apply_raises_and_names_the_fix():
    model = keras_pvera.apply(make_base(), rank=8)
    x, _ = data()
    before = model.predict(x, verbose=0)
    with pytest.raises(ValueError, match="before keras_pvera.apply"):
        model.quantize("int8")
    hidden = model.adapted_layers["hidden"].base_layer
    assert hidden.quantization_mode is None
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)
