"""Layers reading one input share `x @ A.T` within one pass, and only there."""

import threading

import keras
import numpy as np
import pytest
from conftest import numpy_pvera

import keras_pvera
from keras_pvera.src.layers import linear_map
from keras_pvera.src.layers import pvera_dense


def two_readers():
    """One input read by two Dense layers, as attention's query and value."""
    inputs = keras.Input((8,))
    query = keras.layers.Dense(6, name="query")(inputs)
    value = keras.layers.Dense(6, name="value")(inputs)
    return keras.Model(inputs, keras.layers.Add()([query, value]))


def adapted_readers(seed=0):
    model = keras_pvera.apply(two_readers(), rank=4, target=["query", "value"])
    rng = np.random.default_rng(seed)
    for layer in model.adapted_layers.values():
        layer.lambda_d.assign(rng.uniform(0.5, 1.5, 8).astype("float32"))
        layer.lambda_b.assign(rng.normal(size=6).astype("float32"))
    return model


@pytest.fixture
def counted(monkeypatch):
    """Counts the products asked for and those actually computed."""
    counts = {"asked": 0, "computed": 0}
    registry_project = keras_pvera.ProjectionRegistry.project
    linear_project = linear_map.LinearEquation.project

    def asked(self, *args, **kwargs):
        counts["asked"] += 1
        return registry_project(self, *args, **kwargs)

    def computed(self, *args, **kwargs):
        counts["computed"] += 1
        return linear_project(self, *args, **kwargs)

    monkeypatch.setattr(keras_pvera.ProjectionRegistry, "project", asked)
    monkeypatch.setattr(linear_map.LinearEquation, "project", computed)
    return counts


@pytest.fixture
def recorded_noise(monkeypatch):
    """The noise `eps * std` each adapted layer drew, by layer name."""
    noise = {}
    draw = pvera_dense.PVeRADense._noise

    def recording(self, logvar):
        drawn = draw(self, logvar)
        noise[self.name] = keras.ops.convert_to_numpy(drawn)
        return drawn

    monkeypatch.setattr(pvera_dense.PVeRADense, "_noise", recording)
    return noise


def numpy_readers(model, x, noise):
    """The model's training output from PVeRA's formula, layer by layer."""
    registry = model.projection_registry
    a = keras.ops.convert_to_numpy(registry.projection_a)
    b = keras.ops.convert_to_numpy(registry.projection_b)
    total = 0
    for layer in model.adapted_layers.values():
        r = layer.rank
        h = (x @ a.T) * keras.ops.convert_to_numpy(layer.lambda_d)
        std = np.exp(0.5 * h[:, r:])
        eps = noise[layer.name] / std
        y, _ = numpy_pvera(
            x,
            keras.ops.convert_to_numpy(layer.base_layer.kernel),
            keras.ops.convert_to_numpy(layer.base_layer.bias),
            a,
            b,
            keras.ops.convert_to_numpy(layer.lambda_d),
            keras.ops.convert_to_numpy(layer.lambda_b),
            layer.config.alpha,
            eps=eps,
        )
        total = total + y
    return total


def test_readers_of_one_input_compute_its_product_once(counted, recorded_noise):
    model = adapted_readers()
    for seed in range(3):
        x = np.random.default_rng(seed).normal(size=(5, 8)).astype("float32")
        counted.update(asked=0, computed=0)
        y = keras.ops.convert_to_numpy(model(x, training=True))
        assert counted == {"asked": 2, "computed": 1}
        # A second pass on other inputs never reads the first one's product.
        np.testing.assert_allclose(
            y, numpy_readers(model, x, recorded_noise), rtol=1e-5, atol=1e-5
        )
        assert model.projection_registry._shared.entries is None


def test_compiled_training_and_sampled_prediction_share_the_product(counted):
    # JAX and TensorFlow count while tracing, torch on every call: either
    # way one product is computed for every two asked.
    model = adapted_readers()
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    model.train_on_batch(x, np.zeros((4, 6), "float32"))
    assert counted["asked"] == 2 * counted["computed"] > 0
    model.sample_at_inference = True
    layers = list(model.adapted_layers.values())
    states = [keras.ops.convert_to_numpy(la.seed_generator.state) for la in layers]
    counted.update(asked=0, computed=0)
    shared = model.predict_on_batch(x)
    assert counted["asked"] == 2 * counted["computed"] > 0
    # The same noise through the base model (no sharing context): each
    # layer computes its own product, and the outputs are the same.
    for layer, state in zip(layers, states, strict=True):
        layer.seed_generator.state.assign(state)
    counted.update(asked=0, computed=0)
    unshared = model.base_model.predict_on_batch(x)
    assert counted["asked"] == counted["computed"] > 0
    np.testing.assert_allclose(shared, unshared, rtol=1e-5, atol=1e-5)


def test_a_product_lives_in_its_own_pass_and_thread_only():
    model = adapted_readers()
    registry = model.projection_registry
    linear = next(iter(model.adapted_layers.values())).linear
    x = keras.ops.convert_to_tensor(np.ones((2, 8), "float32"))
    assert registry.project(x, linear) is not registry.project(x, linear)
    with registry.sharing_products():
        first = registry.project(x, linear)
        assert registry.project(x, linear) is first
        with registry.sharing_products():  # A nested pass starts empty.
            assert registry.project(x, linear) is not first
        assert registry.project(x, linear) is first
        other_thread = []
        thread = threading.Thread(
            target=lambda: other_thread.append(
                (registry._shared.entries, registry.project(x, linear))
            )
        )
        thread.start()
        thread.join()
        assert other_thread[0][0] is None and other_thread[0][1] is not first
    with registry.sharing_products():
        assert registry.project(x, linear) is not first
    assert registry._shared.entries is None


# The context is backend-independent Python; JAX's generate loop takes
# half a minute to compile.
@pytest.mark.default_backend_only
def test_sampled_generate_shares_the_product(counted):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    model = keras_pvera.apply(causal_lm, rank=2, target=["query", "value"])
    model.sample_at_inference = True
    prompt = {
        "token_ids": np.array([[5, 6, 7, 0, 0, 0]] * 2, "int32"),
        "padding_mask": np.array([[1, 1, 1, 0, 0, 0]] * 2, bool),
    }
    model.generate(prompt, stop_token_ids=None)
    assert counted["asked"] == 2 * counted["computed"] > 0
