import os

import keras
import numpy as np
import pytest

import keras_pvera
from keras_pvera.src.uncertainty import temperature_scaling as calibration


def softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def tempered(p, temperature):
    return softmax(np.log(np.clip(p, 1e-12, 1.0)) / temperature)


def nll(p, y):
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


def make_model(classes=3, activation="softmax", seed=0):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(classes, activation=activation, name="head"),
        ]
    )
    model = keras_pvera.apply(base, rank=4, target=["hidden"])
    # Non-zero lambda_b so that sampled passes differ from each other.
    model.adapted_layers["hidden"].lambda_b.assign(np.full((16,), 0.5, "float32"))
    return model


def inputs(rows, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, 6)).astype("float32") * 2


def labels_from(p, seed=1):
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(p.shape[1], p=row / row.sum()) for row in p])


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6000, 4)) * 3.0
    for true_temperature in (0.5, 2.0):
        y = labels_from(softmax(logits / true_temperature), seed=2)
        log_p = np.log(softmax(logits))[None]
        fitted = calibration.fit_temperature(log_p, y)
        assert abs(fitted / true_temperature - 1) < 0.1, fitted


def test_fit_temperature_minimises_the_monte_carlo_nll():
    rng = np.random.default_rng(1)
    samples = softmax(rng.normal(size=(7, 300, 3)) * 2 + rng.normal(size=(300, 3)))
    y = labels_from(tempered(samples.mean(0), 0.7))
    log_p = np.log(samples)
    fitted = calibration.fit_temperature(log_p, y)
    assert calibration.MIN_TEMPERATURE * 2 < fitted < calibration.MAX_TEMPERATURE / 2
    best = calibration.monte_carlo_nll(log_p, y, fitted)
    for other in (fitted * 0.9, fitted * 1.1, 1.0):
        assert best <= calibration.monte_carlo_nll(log_p, y, other) + 1e-9
    # The NLL of the tempered mean, computed directly.
    mean = np.mean([tempered(s, fitted) for s in samples], axis=0)
    assert best == pytest.approx(nll(mean, y), rel=1e-9)


def test_calibrate_without_sampling_tempers_predict():
    model = make_model()
    x = inputs(3000)
    raw = model.predict(x, verbose=0)
    y = labels_from(tempered(raw, 0.4))
    temperature = keras_pvera.calibrate(model, x, y, n=None)
    assert abs(temperature / 0.4 - 1) < 0.15
    assert model.calibration == {"temperature": temperature, "from_logits": False}
    calibrated = model.predict(x, verbose=0)
    np.testing.assert_allclose(calibrated, tempered(raw, temperature), atol=1e-5)
    np.testing.assert_array_equal(calibrated.argmax(-1), raw.argmax(-1))
    assert nll(calibrated, y) < nll(raw, y)
    model.calibration = None
    np.testing.assert_allclose(model.predict(x, verbose=0), raw, atol=1e-6)


def test_calibrate_fits_the_monte_carlo_mean_and_tempers_every_pass():
    model = make_model()
    x = inputs(400)
    raw = keras_pvera.predict_with_uncertainty(
        model, x, n=6, seed=3, return_samples=True, verbose=0
    )
    assert np.std(raw.samples, axis=0).max() > 1e-3  # the passes differ
    y = labels_from(tempered(raw.mean, 0.5))
    temperature = keras_pvera.calibrate(model, x, y, n=6, seed=3)
    expected = calibration.fit_temperature(np.log(raw.samples.astype("float64")), y)
    assert temperature == pytest.approx(expected, rel=1e-3)
    result = keras_pvera.predict_with_uncertainty(
        model, x, n=6, seed=3, return_samples=True, verbose=0
    )
    passes = np.stack([tempered(s, temperature) for s in raw.samples])
    np.testing.assert_allclose(result.samples, passes, atol=1e-5)
    np.testing.assert_allclose(result.mean, passes.mean(0), atol=1e-5)


def test_training_outputs_are_not_tempered():
    model = make_model()
    model.adapted_layers["hidden"].lambda_b.assign(np.zeros((16,), "float32"))
    x = inputs(8)
    raw = keras.ops.convert_to_numpy(model(x, training=True))
    model.calibration = {"temperature": 0.3, "from_logits": False}
    trained = keras.ops.convert_to_numpy(model(x, training=True))
    np.testing.assert_allclose(trained, raw, atol=1e-6)
    inferred = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(inferred, tempered(raw, 0.3), atol=1e-5)


def test_binary_sigmoid_output_and_logits():
    model = make_model(classes=1, activation="sigmoid")
    x = inputs(2000)
    p = model.predict(x, verbose=0)[:, 0]
    logit = np.log(p) - np.log1p(-p)
    y = np.random.default_rng(4).uniform(size=len(p)) < 1 / (1 + np.exp(-logit / 2.5))
    temperature = keras_pvera.calibrate(model, x, y.astype("int32"), n=None)
    assert abs(temperature / 2.5 - 1) < 0.2
    calibrated = model.predict(x, verbose=0)[:, 0]
    np.testing.assert_allclose(
        calibrated, 1 / (1 + np.exp(-logit / temperature)), atol=1e-5
    )

    logits_model = make_model(classes=3, activation=None)
    raw = logits_model.predict(x, verbose=0)
    y = labels_from(softmax(raw / 0.5))
    temperature = keras_pvera.calibrate(logits_model, x, y, n=None, from_logits=True)
    assert abs(temperature / 0.5 - 1) < 0.15
    np.testing.assert_allclose(
        logits_model.predict(x, verbose=0), raw / temperature, rtol=1e-5, atol=1e-5
    )


def test_calibrate_reads_logits_from_a_linear_output_model_by_default():
    x = inputs(400)
    for n in (None, 4):
        model = make_model(activation=None)
        raw = model.predict(x, verbose=0)
        y = labels_from(softmax(raw / 0.5))
        said = keras_pvera.calibrate(model, x, y, n=n, seed=2, from_logits=True)
        model.calibration = None
        temperature = keras_pvera.calibrate(model, x, y, n=n, seed=2)
        assert temperature == said
        assert model.calibration == {"temperature": temperature, "from_logits": True}
        # Logits read as probabilities cannot be: a ValueError, no temperature.
        model.calibration = None
        with pytest.raises(ValueError, match=r"from_logits=False.*outside \[0, 1\]"):
            keras_pvera.calibrate(model, x, y, n=n, from_logits=False)
        assert model.calibration is None


def test_calibration_says_what_a_model_of_unknown_output_holds():
    # A tanh head says neither logits nor probabilities.
    model = make_model(activation="tanh")
    x = inputs(300)
    y = labels_from(softmax(model.predict(x, verbose=0) * 3))
    with pytest.raises(ValueError, match="since nothing says"):
        keras_pvera.calibrate(model, x, y, n=None)
    unknown = model.predict_with_uncertainty(x, n=2, seed=0, verbose=0)
    assert unknown.from_logits is None
    first = keras_pvera.calibrate(model, x, y, n=None, from_logits=True)
    # The calibration says it from now on: recalibrating, and the statistics.
    assert keras_pvera.calibrate(model, x, y, n=None) == pytest.approx(first)
    result = model.predict_with_uncertainty(x, n=2, seed=0, verbose=0)
    assert result.from_logits is True
    assert np.all(np.isfinite(result.mutual_information()))


def test_one_hot_labels_give_the_same_temperature():
    model = make_model()
    x = inputs(500)
    y = labels_from(model.predict(x, verbose=0))
    by_index = keras_pvera.calibrate(model, x, y, n=None)
    by_one_hot = keras_pvera.calibrate(model, x, np.eye(3)[y], n=None)
    assert by_index == pytest.approx(by_one_hot, rel=1e-9)


def test_keras_file_round_trips_the_temperature(tmp_path):
    model = make_model()
    x = inputs(200)
    y = labels_from(model.predict(x, verbose=0))
    keras_pvera.calibrate(model, x, y, n=4, seed=0)
    path = os.path.join(tmp_path, "calibrated.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.calibration == model.calibration
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    a = loaded.predict_with_uncertainty(x, n=4, seed=5, verbose=0)
    b = model.predict_with_uncertainty(x, n=4, seed=5, verbose=0)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-6)


def test_recalibrating_fits_the_untempered_outputs():
    model = make_model()
    x = inputs(1000)
    y = labels_from(tempered(model.predict(x, verbose=0), 0.5))
    first = keras_pvera.calibrate(model, x, y, n=None)
    second = keras_pvera.calibrate(model, x, y, n=None)
    assert second == pytest.approx(first, rel=1e-9)


def test_bad_inputs_raise_value_errors():
    model = make_model()
    x = inputs(10)
    y = np.arange(10) % 3
    plain = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="PVeRAModel"):
        keras_pvera.calibrate(plain, x, y)
    with pytest.raises(ValueError, match="one label per example"):
        keras_pvera.calibrate(model, x, y[:5], n=None)
    with pytest.raises(ValueError, match="outside 0..2"):
        keras_pvera.calibrate(model, x, y + 1, n=None)
    with pytest.raises(ValueError, match="integer class labels"):
        keras_pvera.calibrate(model, x, y + 0.5, n=None)
    with pytest.raises(ValueError, match="positive integer or None"):
        keras_pvera.calibrate(model, x, y, n=0)
    with pytest.raises(ValueError, match="from_logits='yes'"):
        keras_pvera.calibrate(model, x, y, from_logits="yes")
    assert model.calibration is None  # failed calls leave no temperature
    with pytest.raises(ValueError, match="finite number > 0"):
        model.calibration = {"temperature": -1.0, "from_logits": False}
    with pytest.raises(ValueError, match="keys 'temperature' and 'from_logits'"):
        model.calibration = {"temperature": 1.0}


def test_model_with_two_outputs_is_refused():
    inputs_ = keras.Input((6,))
    hidden = keras.layers.Dense(8, name="hidden")(inputs_)
    outputs = [
        keras.layers.Dense(2, activation="softmax", name="a")(hidden),
        keras.layers.Dense(2, activation="softmax", name="b")(hidden),
    ]
    model = keras_pvera.apply(keras.Model(inputs_, outputs), rank=2, target=["hidden"])
    with pytest.raises(ValueError, match="one output"):
        keras_pvera.calibrate(model, inputs(4), np.zeros(4, "int32"), n=None)
    assert model.calibration is None


def test_peft_files_refuse_a_calibrated_model(tmp_path):
    model = make_model()
    model.calibration = {"temperature": 2.0, "from_logits": False}
    with pytest.raises(ValueError, match="calibration temperature"):
        keras_pvera.save_peft_adapter(model, str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()
