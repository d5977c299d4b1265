"""`max_log_variance`: a bound on the latent log-variance, so that inputs far
outside the data's scale give finite samples; below it, nothing changes."""

import json
import warnings

import keras
import numpy as np
import pytest
import safetensors
from builders import small_mlp as mlp
from builders import tiny_bert
from conftest import SAVED_FILE_SETS
from conftest import needs_keras_3_15
from conftest import saved_file
from keras import ops

import keras_pvera
from keras_pvera import PVeRADense
from keras_pvera import kl_divergence

BOUND = 10.0


def recipe_model(seed, target=("hidden", "head"), **settings):
    """The recipe (`d_initial=3`), `lambda_b` as after training; the same
    vectors for the same `seed` whatever `settings`."""
    model = keras_pvera.apply(
        mlp(), rank=4, target=list(target), seed=seed, d_initial=3.0, **settings
    )
    rng = np.random.default_rng(seed)
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(rng.normal(0.0, 0.5, layer.lambda_b.shape))
    return model


def data(seed):
    """Rows on the data's scale (log-variances far below `BOUND`)."""
    return np.random.default_rng(seed).normal(size=(5, 6)).astype("float32") * 0.3


def largest_log_variance(model, x):
    layer = model.adapted_layers["hidden"]
    return float(np.max(ops.convert_to_numpy(layer.latent(x)[1])))


def samples(model, x, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = keras_pvera.predict_with_uncertainty(
            model, x, n=8, seed=seed, return_samples=True, verbose=0
        )
    return np.asarray(result.samples)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_far_inputs_give_finite_samples_with_the_bound_only(seed):
    far = 100.0 * data(seed)
    unbounded = recipe_model(seed)
    bounded = recipe_model(seed, max_log_variance=BOUND)
    assert largest_log_variance(unbounded, far) > 10 * BOUND
    assert largest_log_variance(bounded, far) == BOUND
    with warnings.catch_warnings(), pytest.warns(UserWarning, match="infinite"):
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's, on NaN
        result = keras_pvera.predict_with_uncertainty(
            unbounded, far, n=8, seed=seed, return_samples=True, verbose=0
        )
    assert not np.all(np.isfinite(np.asarray(result.samples)))
    assert np.all(np.isfinite(samples(bounded, far, seed)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_below_the_bound_everything_is_exactly_as_without_it(seed):
    """A hard clip: the same samples, KL term and training step, bit for
    bit. (One adapted layer: a second one would see the first's sampled
    output, whose log-variance can pass any bound.)"""
    x = data(seed)
    unbounded = recipe_model(seed, ["hidden"], kl_weight=0.1)
    bounded = recipe_model(seed, ["hidden"], kl_weight=0.1, max_log_variance=BOUND)
    assert largest_log_variance(unbounded, x) < BOUND
    np.testing.assert_array_equal(
        samples(bounded, x, seed), samples(unbounded, x, seed)
    )
    for model in (bounded, unbounded):
        model(x, training=True)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.stack(bounded.losses)),
        ops.convert_to_numpy(ops.stack(unbounded.losses)),
    )
    # And the same training step (the gradient below a clip is 1).
    y = np.arange(len(x)) % 3
    for model in (bounded, unbounded):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer="sgd", loss=loss, run_eagerly=True)
        keras.utils.set_random_seed(seed)
        model.fit(x, y, epochs=1, batch_size=5, shuffle=False, verbose=0)
    weights = zip(bounded.trainable_weights, unbounded.trainable_weights, strict=True)
    for a, b in weights:
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_the_kl_term_uses_the_bounded_log_variance():
    layer = PVeRADense(
        keras.layers.Dense(3), rank=4, d_initial=3.0, kl_weight=1.0, max_log_variance=2
    )
    x = 100.0 * np.random.default_rng(0).normal(size=(2, 5)).astype("float32")
    layer(x, training=True)
    mu, logvar = (ops.convert_to_numpy(t) for t in layer.latent(x))
    assert logvar.max() == 2.0 and logvar.min() < 2.0
    expected = np.mean(-0.5 * (1 + logvar - mu**2 - np.exp(logvar)))
    assert np.isfinite(expected)
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(layer.losses[0])), expected, rtol=1e-5
    )
    np.testing.assert_allclose(float(kl_divergence(mu, logvar)), expected, rtol=1e-5)


def test_adapters_picked_per_row_keep_each_ones_bound():
    """Rows of a bounded adapter are finite and as with it alone, beside an
    unbounded adapter's rows (which overflow) or a bounded one's."""
    far = 100.0 * data(0)
    model = recipe_model(0, max_log_variance=BOUND)
    for name, bound in (("unbounded", None), ("same", BOUND)):
        model.add_adapter(
            name,
            rank=4,
            seed=0,
            d_initial=3.0,
            target=["hidden", "head"],
            max_log_variance=bound,
        )
    for layer in model.adapted_layers.values():
        for name, vectors in layer.adapter_vectors.items():
            if name != "default":
                vectors.lambda_b.assign(np.full(vectors.lambda_b.shape, 0.5))

    def sampled(names=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = keras_pvera.predict_with_uncertainty(
                model, far, n=4, seed=0, adapter_names=names, return_samples=True
            )
        return np.asarray(result.samples)

    alone = sampled()
    for other in ("unbounded", "same"):
        rows = sampled(["default", other, "default", other, "__base__"])
        assert np.all(np.isfinite(rows[:, [0, 2, 4]]))
        assert np.all(np.isfinite(rows[:, [1, 3]])) == (other == "same")
        np.testing.assert_allclose(rows[:, [0, 2]], alone[:, [0, 2]], rtol=1e-5)


def test_the_bound_survives_every_config_and_file(tmp_path):
    far = 100.0 * data(0)
    model = recipe_model(0, max_log_variance=BOUND)
    layer = model.adapted_layers["hidden"]
    again = PVeRADense.from_config(json.loads(json.dumps(layer.get_config())))
    assert again.adapter_vectors["default"].config.max_log_variance == BOUND
    expected = samples(model, far, 0)

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.pvera_config.max_log_variance == BOUND
    np.testing.assert_array_equal(samples(loaded, far, 0), expected)

    keras_pvera.save_adapter(model, tmp_path / "adapter.safetensors")
    from_file = keras_pvera.load_adapter(mlp(), tmp_path / "adapter.safetensors")
    assert from_file.pvera_config.max_log_variance == BOUND
    np.testing.assert_array_equal(samples(from_file, far, 0), expected)


def format_version(path):
    with safetensors.safe_open(str(path), framework="numpy") as f:
        return json.loads(f.metadata()["keras_pvera"])["format_version"]


def test_only_files_with_a_bound_need_a_reader_that_knows_it(tmp_path):
    # Version-1 readers refuse version 2 instead of dropping the bound;
    # files without a bound stay readable by them.
    for bound, version in ((BOUND, 2), (None, 1)):
        model = recipe_model(0, max_log_variance=bound)
        path = tmp_path / f"adapter_{version}.safetensors"
        keras_pvera.save_adapter(model, path)
        assert format_version(path) == version
        loaded = keras_pvera.load_adapter(mlp(), path)
        assert loaded.pvera_config.max_log_variance == bound


# The check reads the config before any tensor: one backend is enough.
@pytest.mark.default_backend_only
def test_peft_folders_refuse_an_adapter_with_a_bound(tmp_path):
    bert = tiny_bert(num_layers=1)
    model = keras_pvera.apply(bert, rank=4, max_log_variance=BOUND)
    with pytest.raises(ValueError, match="max_log_variance=10.0.*PEFT's PVeRA"):
        keras_pvera.save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_config.json").exists()


@needs_keras_3_15
@pytest.mark.parametrize("version", SAVED_FILE_SETS)
def test_files_written_before_the_bound_load_without_one(version):
    model = keras.saving.load_model(saved_file(version, "model.keras"))
    assert model.pvera_config.max_log_variance is None
    with open(saved_file(version, "layer_config.json")) as f:
        layer = keras.saving.deserialize_keras_object(json.load(f))
    assert layer.config.max_log_variance is None
    adapted = keras_pvera.load_adapter(
        model.unload(), saved_file(version, "adapter.safetensors")
    )
    assert adapted.pvera_config.max_log_variance is None
