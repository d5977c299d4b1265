"""merge: a plain Keras model with the mean adapters folded into its kernels."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
from builders import randomize_vectors
from builders import tiny_bert

import keras_pvera
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.surgery.layer_walk import iter_layers


def make_base():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(12, activation="tanh", name="middle")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs, name="base")


def relative_error(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


def pvera_classes(model):
    return [
        type(layer).__name__
        for _, layer in iter_layers(model)
        if type(layer).__module__.startswith("keras_pvera")
    ]


X = np.random.default_rng(1).normal(size=(6, 8)).astype("float32")


def test_merged_model_predicts_the_adapted_mean():
    base = make_base()
    base_predictions = base.predict(X, verbose=0)
    adapted = randomize_vectors(
        keras_pvera.apply(base, rank=4, target="all", alpha=2.0), scale=1.0
    )
    expected = adapted.predict(X, verbose=0)
    assert relative_error(expected, base_predictions) > 1e-2

    merged = keras_pvera.merge(adapted)

    assert relative_error(merged.predict(X, verbose=0), expected) <= 1e-5
    assert pvera_classes(merged) == []
    assert merged.get_layer("hidden").activation is keras.activations.relu
    assert merged.get_layer("middle").activation is keras.activations.tanh


def test_merged_model_has_the_base_architecture():
    adapted = randomize_vectors(
        keras_pvera.apply(make_base(), rank=4, target="all"), scale=1.0
    )
    merged = keras_pvera.merge(adapted)
    fresh = make_base()
    assert [type(layer) for layer in merged.layers] == [
        type(layer) for layer in fresh.layers
    ]
    assert merged.count_params() == fresh.count_params()
    assert [tuple(w.shape) for w in merged.weights] == [
        tuple(w.shape) for w in fresh.weights
    ]


def test_merge_folds_the_mean_even_while_sampling():
    adapted = randomize_vectors(
        keras_pvera.apply(make_base(), rank=4, sample_at_inference=True), scale=1.0
    )
    first = adapted.predict(X, verbose=0)
    assert np.abs(first - adapted.predict(X, verbose=0)).max() > 0  # sampling

    merged = keras_pvera.merge(adapted)

    assert adapted.sample_at_inference  # untouched
    adapted.sample_at_inference = False
    mean = adapted.predict(X, verbose=0)
    assert relative_error(merged.predict(X, verbose=0), mean) <= 1e-5


def test_adapted_model_is_left_intact():
    adapted = randomize_vectors(
        keras_pvera.apply(make_base(), rank=4, target="all"), scale=1.0
    )
    before = adapted.predict(X, verbose=0)
    vectors = {
        path: keras.ops.convert_to_numpy(layer.lambda_b).copy()
        for path, layer in adapted.adapted_layers.items()
    }

    keras_pvera.merge(adapted)

    np.testing.assert_array_equal(adapted.predict(X, verbose=0), before)
    for path, layer in adapted.adapted_layers.items():
        assert isinstance(layer, PVeRADense)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(layer.lambda_b), vectors[path]
        )
    assert [type(layer).__name__ for layer in adapted.base_model.layers[1:3]] == [
        "PVeRADense",
        "PVeRADense",
    ]


@pytest.mark.slow
def test_kerashub_bert_with_einsum_dense_layers():
    def bert():
        return tiny_bert(
            seed=None, hidden_dim=16, intermediate_dim=32, max_sequence_length=16
        )

    base = bert()
    adapted = randomize_vectors(
        keras_pvera.apply(base, rank=8, target="all"), scale=1.0
    )
    rng = np.random.default_rng(0)
    inputs = {
        "token_ids": rng.integers(0, 50, (2, 8)),
        "segment_ids": np.zeros((2, 8), "int32"),
        "padding_mask": np.ones((2, 8), bool),
    }
    expected = adapted.predict(inputs, verbose=0)

    merged = keras_pvera.merge(adapted)

    assert type(merged) is type(base)
    assert pvera_classes(merged) == []
    actual = merged.predict(inputs, verbose=0)
    for key in ("sequence_output", "pooled_output"):
        assert relative_error(actual[key], expected[key]) <= 1e-5


@keras.saving.register_keras_serializable(package="test_merging")
class Tower(keras.Model):
    """A subclassed model whose sublayers get generated names."""

    def __init__(self, units=6, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, activation="tanh")
        self.outer = keras.layers.Dense(2)

    def call(self, x):
        return self.outer(self.inner(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_subclassed_model_with_generated_layer_names():
    base = Tower()
    base(X[:1])
    adapted = randomize_vectors(
        keras_pvera.apply(base, rank=4, target="all"), scale=1.0
    )
    expected = adapted.predict(X, verbose=0)

    merged = keras_pvera.merge(adapted)

    assert merged.inner.name != base.inner.name  # names differ, pairing holds
    assert relative_error(merged.predict(X, verbose=0), expected) <= 1e-5


@keras.saving.register_keras_serializable(package="test_merging")
class Scaler(keras.layers.Layer):
    """Weightless, like a KerasHub preprocessor: it makes its sublayer (a
    packer there) when it first runs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.step = None

    def build(self, input_shape):
        self.step = keras.layers.Rescaling(0.5)

    def call(self, x):
        return self.step(x)


@keras.saving.register_keras_serializable(package="test_merging")
class Pipeline(keras.Model):
    """A network beside a preprocessing layer that runs outside it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scaler = Scaler()
        self.inner = keras.layers.Dense(6, activation="tanh")
        self.outer = keras.layers.Dense(2)

    def call(self, x):
        return self.outer(self.inner(x))


def test_a_weightless_sublayer_made_on_first_use_is_not_paired():
    base = Pipeline()
    base(X[:1])
    adapted = randomize_vectors(
        keras_pvera.apply(base, rank=4, target="all"), scale=1.0
    )
    x = keras.ops.convert_to_numpy(adapted.base_model.scaler(X))  # makes `step`
    expected = adapted.predict(x, verbose=0)

    merged = keras_pvera.merge(adapted)

    assert merged.scaler.step is None  # rebuilt from its configuration
    assert relative_error(merged.predict(x, verbose=0), expected) <= 1e-5


def test_merge_needs_a_pvera_model():
    with pytest.raises(TypeError, match="PVeRAModel"):
        keras_pvera.merge(make_base())


class Unserializable(keras.Model):
    def __init__(self, units):
        super().__init__()
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        return self.dense(x)


def test_merge_needs_a_serializable_base_model():
    base = Unserializable(4)
    base(X[:1])
    adapted = keras_pvera.apply(base, rank=2, target="all")
    with pytest.raises(ValueError, match="could not be serialized"):
        keras_pvera.merge(adapted)


@pytest.mark.slow
def test_merged_model_loads_without_keras_pvera(tmp_path):
    adapted = randomize_vectors(
        keras_pvera.apply(make_base(), rank=4, target="all"), scale=1.0
    )
    merged = keras_pvera.merge(adapted)
    path = tmp_path / "merged.keras"
    merged.save(path)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "expected.npy", adapted.predict(X, verbose=0))
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    assert "keras_pvera" not in config
    assert json.loads(config)["class_name"] == "Functional"

    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["keras_pvera"] = None  # any import of it now fails
        import keras
        import numpy as np
        model = keras.saving.load_model({str(path)!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        expected = np.load({str(tmp_path / "expected.npy")!r})
        actual = model.predict(x, verbose=0)
        error = np.abs(actual - expected).max() / np.abs(expected).max()
        assert error <= 1e-5, error
        assert not any(name.startswith("keras_pvera.") for name in sys.modules)
        print("loaded", type(model).__name__)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded Functional" in result.stdout
