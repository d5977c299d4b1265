import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from builders import bert_inputs
from builders import randomize_vectors
from builders import tiny_bert
from builders import to_numpy
from conftest import SAVED_FILE_SETS
from conftest import needs_keras_3_15
from conftest import saved_file

import keras_pvera
from keras_pvera import PVeRADense


def weights_by_path(model):
    return {w.path: to_numpy(w).copy() for w in model.weights}


def mlp():
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden_1"),
            keras.layers.Dense(16, activation="relu", name="hidden_2"),
            keras.layers.Dense(3, name="head"),
        ],
        name="mlp",
    )


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype("float32"), rng.normal(size=(n, 3)).astype(
        "float32"
    )


def test_sequential_starts_equal_to_its_base_and_trains_only_the_vectors():
    base = mlp()
    x, y = data()
    expected = base.predict(x, verbose=0)
    frozen_before = weights_by_path(base)
    model = keras_pvera.apply(base, rank=4)
    assert list(model.adapted_layers) == ["hidden_1", "hidden_2"]  # not head
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    assert sorted(w.path for w in model.trainable_weights) == [
        "mlp/hidden_1/pvera_lambda_b",
        "mlp/hidden_1/pvera_lambda_d",
        "mlp/hidden_2/pvera_lambda_b",
        "mlp/hidden_2/pvera_lambda_d",
    ]

    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    after = {w.path: to_numpy(w) for w in model.weights}
    for path, value in frozen_before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    assert not np.allclose(after["mlp/hidden_1/pvera_lambda_b"], 0.0)
    assert not np.allclose(model.predict(x, verbose=0), expected)


def test_functional_model_with_dict_inputs():
    left = keras.Input((4,), name="left")
    right = keras.Input((6,), name="right")
    joined = keras.layers.Concatenate()(
        [
            keras.layers.Dense(8, name="left_dense")(left),
            keras.layers.Dense(8, name="right_dense")(right),
        ]
    )
    outputs = keras.layers.Dense(2, name="out")(
        keras.layers.Dense(8, activation="gelu", name="mix")(joined)
    )
    base = keras.Model({"left": left, "right": right}, outputs)
    rng = np.random.default_rng(1)
    x = {
        "left": rng.normal(size=(16, 4)).astype("float32"),
        "right": rng.normal(size=(16, 6)).astype("float32"),
    }
    y = rng.normal(size=(16, 2)).astype("float32")
    expected = base.predict(x, verbose=0)

    model = keras_pvera.apply(base, rank=4, target="all")
    assert sorted(model.adapted_layers) == ["left_dense", "mix", "right_dense"]
    assert model.projection_registry.in_max == 16  # mix: 16 -> 8
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@keras.saving.register_keras_serializable(package="tests")
class Block(keras.layers.Layer):
    """A custom layer holding Dense layers in an attribute and in a list."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.proj = keras.layers.Dense(units, name="proj")
        self.experts = [keras.layers.Dense(units, name=f"expert_{i}") for i in range(2)]

    def build(self, input_shape):
        self.proj.build(input_shape)
        for expert in self.experts:
            expert.build((*input_shape[:-1], self.units))

    def call(self, x):
        h = self.proj(x)
        return self.experts[0](h) + self.experts[1](h)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="tests")
class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = Block(8, name="block")
        self.norm = keras.layers.BatchNormalization(name="norm")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x, training=None):
        return self.head(self.norm(self.block(x), training=training))


def test_subclassed_model_with_nested_layers_trains_and_saves(tmp_path):
    base = Subclassed()
    x, y = data()
    base(x[:1])
    expected = base.predict(x, verbose=0)
    model = keras_pvera.apply(
        base, rank=4, target=["proj", "expert_1"], trainable_layers=["head"]
    )
    assert list(model.adapted_layers) == ["block/proj", "block/expert_1"]
    assert isinstance(base.block.proj, PVeRADense)
    assert isinstance(base.block.experts[1], PVeRADense)
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    expected_trainable = [base.head.kernel, base.head.bias]
    for adapter in model.adapted_layers.values():
        expected_trainable += [adapter.lambda_d, adapter.lambda_b]
    assert {id(w) for w in model.trainable_weights} == {
        id(w) for w in expected_trainable
    }
    assert len(model.trainable_weights) == 6

    norm_before = [to_numpy(w).copy() for w in base.norm.weights]
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    # Frozen BatchNormalization: its moving statistics did not move either.
    for before, after in zip(norm_before, base.norm.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(after), before)

    path = str(tmp_path / "subclassed.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    loaded_trainable = [loaded.base_model.head.kernel, loaded.base_model.head.bias]
    for adapter in loaded.adapted_layers.values():
        loaded_trainable += [adapter.lambda_d, adapter.lambda_b]
    assert {id(w) for w in loaded.trainable_weights} == {
        id(w) for w in loaded_trainable
    }
    assert list(loaded.adapted_layers) == list(model.adapted_layers)


def test_default_target_and_the_all_target_skip_output_layers():
    base = mlp()
    model = keras_pvera.apply(base, rank=2, target=None)
    assert "head" not in model.adapted_layers
    base = mlp()
    model = keras_pvera.apply(base, rank=2, target=r"hidden_\d")
    assert list(model.adapted_layers) == ["hidden_1", "hidden_2"]
    base = mlp()
    model = keras_pvera.apply(base, rank=2, target=lambda layer: layer.name == "head")
    assert list(model.adapted_layers) == ["head"]


def bert_classifier():
    backbone = tiny_bert(seed=None)
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name)
        for name in ("token_ids", "segment_ids", "padding_mask")
    }
    pooled = backbone(inputs)["pooled_output"]
    logits = keras.layers.Dense(2, name="classifier")(pooled)
    return keras.Model(inputs, logits, name="bert_classifier")


@pytest.mark.slow
def test_keras_hub_backbone_adapts_query_and_value_einsum_dense():
    base = tiny_bert(seed=None)
    x = bert_inputs()
    expected = base.predict(x, verbose=0)
    model = keras_pvera.apply(base, rank=4)
    assert sorted(model.adapted_layers) == [
        f"transformer_layer_{i}/self_attention_layer/{name}"
        for i in range(2)
        for name in ("query", "value")
    ]
    assert all(
        isinstance(layer.base_layer, keras.layers.EinsumDense)
        for layer in model.adapted_layers.values()
    )
    outputs = model.predict(x, verbose=0)
    for key in expected:
        np.testing.assert_array_equal(outputs[key], expected[key])
    randomize_vectors(model)
    assert not np.allclose(
        model.predict(x, verbose=0)["sequence_output"], expected["sequence_output"]
    )


@pytest.mark.slow
def test_keras_hub_classifier_with_kl_trains_saves_and_resumes(tmp_path):
    base = bert_classifier()
    x = bert_inputs(16)
    y = np.arange(16) % 2
    model = keras_pvera.apply(
        base, rank=4, kl_weight=1e-3, trainable_layers=["classifier"]
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert "kl_loss" in history.history
    assert all(np.isfinite(v) and v > 0 for v in history.history["kl_loss"])

    path = str(tmp_path / "bert.keras")
    model.save(path)
    expected = model.predict(x, verbose=0)
    np.save(tmp_path / "x.npy", x["token_ids"])
    np.save(tmp_path / "expected.npy", expected)
    # A fresh process that imports only keras_pvera (no custom_objects).
    script = f"""
import numpy as np, keras, keras_pvera
model = keras.models.load_model({path!r})
ids = np.load({str(tmp_path / "x.npy")!r})
x = {{"token_ids": ids, "segment_ids": np.zeros_like(ids),
     "padding_mask": np.ones_like(ids)}}
expected = np.load({str(tmp_path / "expected.npy")!r})
diff = np.abs(model.predict(x, verbose=0) - expected).max()
print("max_abs_diff", diff)
print("trainable", sorted(w.path for w in model.trainable_weights))
model.fit(x, np.arange(len(ids)) % 2, epochs=1, verbose=0)
print("resumed", int(keras.ops.convert_to_numpy(model.optimizer.iterations)))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(
        line.split(" ", 1)
        for line in result.stdout.splitlines()
        if line.split(" ", 1)[0] in ("max_abs_diff", "trainable", "resumed")
    )
    assert float(lines["max_abs_diff"]) <= 1e-6
    assert lines["trainable"] == str(sorted(w.path for w in model.trainable_weights))
    # 2 epochs x 2 steps before saving, 1 more (one batch) after loading.
    assert int(float(lines["resumed"])) == 5


def test_kl_loss_is_the_summed_layer_kl_and_is_added_to_the_loss():
    base = mlp()
    x, y = data(8)
    kl_weight = 0.5
    model = keras_pvera.apply(base, rank=4, kl_weight=kl_weight)
    # Expected KL at the initial weights, from the NumPy formula.
    expected_kl = 0.0
    features = x
    for layer in (base.layers[0], base.layers[1]):
        adapter = model.adapted_layers[layer.name]
        a, _ = model.projection_registry.projections(adapter.in_dim, adapter.out_dim)
        h = to_numpy(adapter.lambda_d) * (features @ to_numpy(a).T)
        mu, logvar = h[:, :4], h[:, 4:]
        expected_kl += np.mean(-0.5 * (1 + logvar - mu**2 - np.exp(logvar)))
        features = to_numpy(adapter(features))
    mse = np.mean((base.predict(x, verbose=0) - y) ** 2)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_allclose(history.history["kl_loss"][0], expected_kl, rtol=1e-4)
    np.testing.assert_allclose(
        history.history["loss"][0], mse + kl_weight * expected_kl, rtol=1e-4
    )


def test_save_projection_false_writes_a_smaller_file_with_equal_predictions(tmp_path):
    x, _ = data()
    base_weights = mlp().get_weights()
    sizes, predictions = {}, {}
    for save_projection in (True, False):
        base = mlp()
        base.set_weights(base_weights)
        model = keras_pvera.apply(
            base, rank=64, seed=3, save_projection=save_projection
        )
        randomize_vectors(model)
        path = str(tmp_path / f"{save_projection}.keras")
        model.save(path)
        sizes[save_projection] = os.path.getsize(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(
            loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
        )
        predictions[save_projection] = loaded.predict(x, verbose=0)
    projection_bytes = 4 * (2 * 64 * 16 + 16 * 64)
    saved = sizes[True] - sizes[False]
    # .keras is a zip: compressed random floats stay close to their size.
    assert 0.85 * projection_bytes <= saved <= 1.1 * projection_bytes
    np.testing.assert_array_equal(predictions[True], predictions[False])


def test_sampling_at_inference_can_be_switched_on_and_off():
    model = keras_pvera.apply(mlp(), rank=4)
    randomize_vectors(model)
    x, _ = data(4)
    mean = model.predict(x, verbose=0)
    model.sample_at_inference = True
    first, second = model.predict(x, verbose=0), model.predict(x, verbose=0)
    assert not np.allclose(first, second)
    model.sample_at_inference = False
    np.testing.assert_array_equal(model.predict(x, verbose=0), mean)


def test_the_sampling_switch_is_stored_once_in_the_layers(tmp_path):
    model = keras_pvera.apply(mlp(), rank=4)
    layers = list(model.adapted_layers.values())
    model.sample_at_inference = True
    assert all(layer.sample_at_inference for layer in layers)
    assert model.pvera_config.sample_at_inference
    model.sample_at_inference = False
    layers[0].sample_at_inference = True  # One layer on: the model reports it.
    assert model.sample_at_inference and model.pvera_config.sample_at_inference
    path = str(tmp_path / "sampling.keras")
    model.save(path)
    assert keras.models.load_model(path).sample_at_inference


def test_the_seed_means_the_adapter_seed_in_every_config():
    model = keras_pvera.apply(mlp(), rank=4, seed=7)
    layers = list(model.adapted_layers.values())
    assert {layer.config.seed for layer in layers} == {7}
    assert model.projection_registry.seed == 7
    # Each layer draws its noise from its own stream, saved with the layer.
    noise_seeds = [layer.noise_seed for layer in layers]
    assert len(set(noise_seeds)) == len(layers) and 7 not in noise_seeds
    rebuilt = PVeRADense.from_config(layers[0].get_config())
    assert rebuilt.noise_seed == noise_seeds[0] and rebuilt.config.seed == 7


def test_summary_lists_adapted_layers_and_parameter_counts():
    model = keras_pvera.apply(mlp(), rank=4)
    lines = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line))
    text = "\n".join(lines)
    assert "2 adapted layers" in text and "hidden_1" in text
    trainable, total = model.parameter_counts()
    assert trainable == 2 * (2 * 4 + 16)
    assert f"trainable params: {trainable:,} || all params: {total:,}" in text


def test_pvera_summary_prints_as_keras_summary_does(capsys):
    model = keras_pvera.apply(mlp(), rank=4)
    assert model.pvera_summary() is None
    printed = capsys.readouterr().out
    assert "2 adapted layers" in printed and "hidden_1" in printed
    texts = []
    model.pvera_summary(print_fn=texts.append)
    assert texts == [printed.rstrip("\n")]


def test_non_finite_lambdas_raise_instead_of_predicting_nan():
    model = keras_pvera.apply(mlp(), rank=4)
    layer = model.adapted_layers["hidden_1"]
    layer.lambda_b.assign(np.full(layer.lambda_b.shape, np.nan))
    with pytest.raises(ValueError, match="hidden_1/pvera_lambda_b"):
        model.predict(data(2)[0], verbose=0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": "8"}, ValueError, "rank"),
        ({"kl_weight": -1.0}, ValueError, "kl_weight"),
        ({"dropout": 1.5}, ValueError, "dropout"),
        ({"d_initial": 0.0}, ValueError, "d_initial"),
        ({"alpha": float("inf")}, ValueError, "alpha"),
        ({"seed": -1}, ValueError, "seed"),
        ({"target": ["nope"]}, ValueError, "'nope' matches no layer.*hidden_1"),
        ({"target": "nothing.*"}, ValueError, "matches no layer.*hidden_1"),
        ({"target": lambda layer: False}, ValueError, "matches no layer"),
        ({"target": 3}, ValueError, "target"),
        ({"trainable_layers": ["missing"]}, ValueError, "missing"),
        ({"target": ["head"], "trainable_layers": ["head"]}, ValueError, "head"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_as_it_was(kwargs, error, message):
    base = mlp()
    x, _ = data(4)
    expected = base.predict(x, verbose=0)
    trainable_before = [w.path for w in base.trainable_weights]
    kwargs.setdefault("rank", 4)
    with pytest.raises(error, match=message):
        keras_pvera.apply(base, **kwargs)
    assert [w.path for w in base.trainable_weights] == trainable_before
    assert not any(isinstance(layer, PVeRADense) for layer in base.layers)
    np.testing.assert_array_equal(base.predict(x, verbose=0), expected)


def test_a_wrong_input_width_raises_the_error_of_the_base_model():
    """The adapted layer checks its inputs as the layer it wraps does."""
    x = np.ones((2, 5), "float32")  # mlp() takes 8 features
    message = r"expected axis -1 of input shape to have value 8.*shape \(2, 5\)"
    with pytest.raises(ValueError, match=message):
        mlp().predict(x, verbose=0)
    model = keras_pvera.apply(mlp(), rank=4)
    with pytest.raises(ValueError, match=message):
        model.predict(x, verbose=0)


def test_saving_to_a_legacy_h5_file_is_refused_naming_the_keras_format(tmp_path):
    model = keras_pvera.apply(mlp(), rank=4)
    for name in ("model.h5", "model.HDF5"):
        with pytest.raises(ValueError, match=r"`.keras` format.*model.keras"):
            model.save(str(tmp_path / name))
        assert not (tmp_path / name).exists()


def test_a_layer_pvera_cannot_adapt_is_refused_by_name():
    inputs = keras.Input((6, 4))
    conv = keras.layers.Conv1DTranspose(3, 2, name="conv")
    base = keras.Model(inputs, keras.layers.Dense(2)(conv(inputs)))
    with pytest.raises(TypeError, match="'conv' is a Conv1DTranspose"):
        keras_pvera.apply(base, rank=4, target=["conv"])
    with pytest.raises(TypeError, match="'conv' is a Conv1DTranspose"):
        keras_pvera.apply(base, rank=4, target=lambda layer: True)


def test_unbuilt_and_already_adapted_models_are_refused():
    unbuilt = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built.*model.build"):
        keras_pvera.apply(unbuilt, rank=4)
    model = keras_pvera.apply(mlp(), rank=4)
    with pytest.raises(ValueError, match="already adapted"):
        keras_pvera.apply(model, rank=4)
    with pytest.raises(ValueError, match="already adapted"):
        keras_pvera.apply(model.base_model, rank=4)


def test_a_failure_during_surgery_is_rolled_back(monkeypatch):
    from keras_pvera.src.surgery import adapter_registry

    base = mlp()
    x, _ = data(4)
    expected = base.predict(x, verbose=0)

    def broken_freeze(*args):
        raise RuntimeError("freeze failed")

    monkeypatch.setattr(adapter_registry.AdapterRegistry, "freeze", broken_freeze)
    with pytest.raises(RuntimeError, match="freeze failed"):
        keras_pvera.apply(base, rank=4)
    assert [layer.name for layer in base.layers] == ["hidden_1", "hidden_2", "head"]
    assert all(type(layer) is keras.layers.Dense for layer in base.layers)
    assert base.layers[0].activation is keras.activations.relu
    assert len(base.trainable_weights) == 6
    np.testing.assert_array_equal(base.predict(x, verbose=0), expected)


@pytest.mark.slow
def test_query_and_value_share_one_projection_per_attention_layer():
    base = tiny_bert(seed=None, dropout=0.0)
    x = bert_inputs(4)
    model = keras_pvera.apply(base, rank=4)
    randomize_vectors(model)
    registry = model.projection_registry
    products = []
    project = registry.project

    def recording_project(*args, **kwargs):
        products.append(project(*args, **kwargs))
        return products[-1]

    registry.project = recording_project
    states = {
        p: to_numpy(layer.seed_generator.state).copy()
        for p, layer in model.adapted_layers.items()
    }
    shared = to_numpy(model(x, training=True)["sequence_output"])
    # Four adapted layers asked; one product per attention layer computed.
    assert len(products) == 4
    assert len({id(product) for product in products}) == 2

    # Without the model's context (calling the base model), nothing is
    # shared, and the same noise gives the same outputs.
    for path, layer in model.adapted_layers.items():
        layer.seed_generator.state.assign(states[path])
    products.clear()
    unshared = to_numpy(model.base_model(x, training=True)["sequence_output"])
    assert len({id(product) for product in products}) == 4
    np.testing.assert_allclose(shared, unshared, rtol=1e-5, atol=1e-5)


def test_kl_loss_is_logged_for_training_not_as_a_zero_validation_figure():
    model = keras_pvera.apply(mlp(), rank=4, kl_weight=1e-3)
    x, y = data(16)
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0)
    assert history.history["kl_loss"][0] > 0
    assert "val_kl_loss" not in history.history
    assert "val_loss" in history.history


@needs_keras_3_15
@pytest.mark.parametrize("version", SAVED_FILE_SETS)
def test_a_keras_file_written_by_an_earlier_version_still_loads(version):
    # tests/data/make_saved_files.py wrote it with that version.
    expected = np.load(saved_file(version, "expected.npz"))
    model = keras.saving.load_model(saved_file(version, "model.keras"))
    assert model.adapter_names == ["default"]
    assert list(model.adapted_layers) == ["hidden", "middle"]
    assert model.trainable_paths == ["head"]
    config = model.pvera_config
    assert (config.rank, config.seed, config.alpha, config.kl_weight) == (
        4,
        5,
        2.0,
        1e-3,
    )
    np.testing.assert_allclose(
        model.predict(expected["x"], verbose=0), expected["y"], atol=1e-6
    )


def test_the_adapted_model_is_named_after_its_base(tmp_path):
    model = keras_pvera.apply(mlp(), rank=4)
    assert model.name == "pvera_mlp"
    assert keras_pvera.apply(mlp(), rank=4, name="tuned").name == "tuned"
    path = str(tmp_path / "model.keras")
    model.save(path)
    assert keras.saving.load_model(path).name == "pvera_mlp"


def test_a_loaded_model_is_compiled_and_loading_warns_nothing(tmp_path):
    from custom_layers import SelfCompilingModel

    # A base that compiles itself and overrides `compile` (as a KerasHub task
    # does), compiled again by the user before adaptation.
    base = SelfCompilingModel(name="task")
    base.compile(optimizer="sgd", loss="mae")
    model = keras_pvera.apply(base, rank=4)
    x, y = data(16)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = keras.saving.load_model(path)
        merged = keras_pvera.merge(loaded)
    assert loaded.compiled and isinstance(loaded.optimizer, keras.optimizers.Adam)
    assert loaded.optimizer.iterations.numpy() == model.optimizer.iterations.numpy()
    np.testing.assert_allclose(
        float(loaded.optimizer.learning_rate.numpy()), 1e-2, rtol=1e-6
    )
    loaded.fit(x, y, epochs=1, verbose=0)  # No compile() needed.
    # The merged task is compiled by its own constructor, as when loaded.
    assert merged.compiled and merged.name == "task"


def test_merging_keeps_the_compile_state_of_a_plain_base():
    base = mlp()
    base.compile(optimizer="sgd", loss="mae")
    merged = keras_pvera.merge(keras_pvera.apply(base, rank=4))
    assert merged.compiled and isinstance(merged.optimizer, keras.optimizers.SGD)
