"""PVeRA under Keras' mixed-precision policies.

The adapter's latent math (`mu`, `logvar`, the noise `eps * exp(0.5 *
logvar)` and the KL term) runs in float32 whatever the policy, so
`exp(logvar)` cannot overflow in float16; the latent code is cast back to the
compute dtype before `B`, so outputs follow the policy.
"""

import keras
import numpy as np
import pytest

import keras_pvera


def make_base():
    """Built under the current global policy, as a user's model would be."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(16, activation="relu", name="middle")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def as_float32(array):
    return np.asarray(keras.ops.convert_to_numpy(array)).astype("float32")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_apply_fit_and_uncertainty_under_a_mixed_policy(policy):
    keras.config.set_dtype_policy(policy)
    compute_dtype = keras.mixed_precision.dtype_policy().compute_dtype
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.integers(0, 3, size=(64,))
    model = keras_pvera.apply(make_base(), rank=16, kl_weight=1e-6)
    optimizer = keras.optimizers.Adam(1e-2)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # A large lambda_d on the log-variance half: logvar up to about 15,
    # so exp(logvar) would overflow float16 (max 65504) if it ran there.
    for layer in model.adapted_layers.values():
        assert layer.compute_dtype == compute_dtype
        assert layer.lambda_d.dtype == "float32"
        d = np.full((32,), 0.1, "float32")
        d[16:] = 3.0
        layer.lambda_d.assign(d)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    for name in ("loss", "kl_loss"):
        assert np.all(np.isfinite(history.history[name])), (name, history.history)
    for layer in model.adapted_layers.values():
        assert np.all(np.isfinite(as_float32(layer.lambda_d)))
        assert np.any(as_float32(layer.lambda_b) != 0)  # it trained

    outputs = model(x[:4])
    assert keras.backend.standardize_dtype(outputs.dtype) == compute_dtype
    predictions = model.predict(x, verbose=0)
    assert keras.backend.standardize_dtype(predictions.dtype) == compute_dtype
    assert np.all(np.isfinite(as_float32(predictions)))

    result = model.predict_with_uncertainty(
        x[:8], n=5, seed=1, return_samples=True, verbose=0
    )
    assert keras.backend.standardize_dtype(result.samples.dtype) == compute_dtype
    samples = as_float32(result.samples)
    assert samples.shape == (5, 8, 3)
    assert np.all(np.isfinite(samples))
    assert np.all(np.isfinite(result.std)) and np.any(result.std > 0)
