"""evaluate_uncertainty: the mean, Monte Carlo and calibrated predictors,
scored side by side.

Each figure is recomputed here from what the user would call by hand
(`predict_with_uncertainty` with the same seed, `predict` with sampling
off) and scikit-learn's metrics; the metrics themselves are checked in
test_metrics.py.
"""

import os

import keras
import numpy as np
import pytest
from sklearn.metrics import brier_score_loss
from sklearn.metrics import log_loss
from sklearn.metrics import roc_auc_score

import keras_pvera
from keras_pvera.src.uncertainty.metrics import area_under_risk_coverage

FEATURES = 4
# Every seed passes on every backend (KERAS_PVERA_FULL_MATRIX=1 runs them);
# JAX compiles each predict function anew (about 8 s a test on 2 CPU
# cores), so the JAX and TensorFlow runs keep seed 0: the code compared is
# the same for every seed.
SEEDS = [
    0,
    pytest.param(1, marks=pytest.mark.default_backend_only),
    pytest.param(2, marks=pytest.mark.default_backend_only),
]


def tiny_model(units=3, activation=None):
    """A tiny adapted model whose sampled passes differ (lambda_b random)."""
    base = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, name="hidden"),
            keras.layers.Dense(units, activation=activation, name="head"),
        ]
    )
    model = keras_pvera.apply(base, rank=4, seed=0, d_initial=1.0)
    rng = np.random.default_rng(0)
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(rng.normal(0.0, 1.0, layer.lambda_b.shape))
    return model


def data(rows=12, seed=0, scale=1.0):
    x = np.random.default_rng(seed).normal(size=(rows, FEATURES)) * scale
    return x.astype("float32")


def softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def expected_classification(probabilities, labels, num_classes):
    """The figures as scikit-learn (and the metric modules) compute them."""
    return {
        "accuracy": np.mean(probabilities.argmax(axis=1) == labels),
        "nll": log_loss(labels, probabilities, labels=list(range(num_classes))),
        "brier": brier_score_loss(
            labels,
            probabilities,
            labels=list(range(num_classes)),
            scale_by_half=False,
        ),
        "ece": keras_pvera.expected_calibration_error(labels, probabilities),
        "aurc": area_under_risk_coverage(labels, probabilities),
    }


def assert_figures(actual, expected):
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def ood_auroc(inside, outside):
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return roc_auc_score(truth, np.r_[inside, outside])


@pytest.mark.parametrize("seed", SEEDS)
def test_monte_carlo_figures_equal_predict_with_uncertainty_with_the_seed(seed):
    model = tiny_model()  # Logits: a linear head.
    x, x_far = data(), data(seed=1, scale=5.0)
    labels = np.arange(12) % 3
    report = keras_pvera.evaluate_uncertainty(model, x, labels, x_far, n=4, seed=seed)
    assert report.predictors == ["mean", "monte_carlo"]
    assert report.task == "classification" and report.seed == seed

    result = keras_pvera.predict_with_uncertainty(model, x, 4, seed=seed, verbose=0)
    far = keras_pvera.predict_with_uncertainty(model, x_far, 4, seed=seed, verbose=0)
    p, p_far = result.mean_probabilities(), far.mean_probabilities()
    figures = report.metrics["monte_carlo"]
    assert_figures(figures, expected_classification(p, labels, 3))
    assert_figures(
        figures,
        {
            "auroc_max_probability": ood_auroc(-p.max(axis=1), -p_far.max(axis=1)),
            "auroc_entropy": ood_auroc(
                result.predictive_entropy(), far.predictive_entropy()
            ),
            "auroc_mi": ood_auroc(
                result.mutual_information(), far.mutual_information()
            ),
        },
    )
    # The mean predictor is `predict` with sampling off: a softmax of logits.
    mean = softmax(model.predict(x, verbose=0))
    assert_figures(report.metrics["mean"], expected_classification(mean, labels, 3))
    assert "auroc_mi" not in report.metrics["mean"]
    for row in report.metrics.values():
        assert row["seconds_per_example"] > 0


def test_calibrated_predictors_are_the_calibrated_models_and_it_stays_so():
    model = tiny_model(activation="softmax")  # Probabilities.
    x, labels = data(), np.arange(12) % 3
    keras_pvera.calibrate(model, x, labels, n=4, seed=0)
    calibration = model.calibration
    report = keras_pvera.evaluate_uncertainty(model, x, labels, n=4, seed=3)
    assert model.calibration == calibration
    assert report.temperature == calibration["temperature"]
    assert report.predictors == [
        "mean",
        "monte_carlo",
        "mean_calibrated",
        "monte_carlo_calibrated",
    ]
    calibrated = keras_pvera.predict_with_uncertainty(model, x, 4, seed=3, verbose=0)
    tempered_mean = model.predict(x, verbose=0)
    model.calibration = None
    raw = keras_pvera.predict_with_uncertainty(model, x, 4, seed=3, verbose=0)
    raw_mean = model.predict(x, verbose=0)
    for name, p in [
        ("mean", raw_mean),
        ("monte_carlo", raw.mean_probabilities()),
        ("mean_calibrated", tempered_mean),
        ("monte_carlo_calibrated", calibrated.mean_probabilities()),
    ]:
        assert_figures(report.metrics[name], expected_classification(p, labels, 3))


def test_the_mean_predictor_does_not_sample_when_the_model_does():
    model = tiny_model()
    x, labels = data(), np.arange(12) % 3
    mean = softmax(model.predict(x, verbose=0))
    model.sample_at_inference = True
    report = keras_pvera.evaluate_uncertainty(model, x, labels, n=2, seed=0)
    assert model.sample_at_inference
    assert_figures(report.metrics["mean"], expected_classification(mean, labels, 3))


def test_a_binary_sigmoid_unit_and_one_hot_labels_are_classifications():
    model = tiny_model(units=1, activation="sigmoid")
    x, labels = data(), np.arange(12) % 2
    report = keras_pvera.evaluate_uncertainty(model, x, labels, n=3, seed=0)
    assert report.task == "classification"
    result = keras_pvera.predict_with_uncertainty(model, x, 3, seed=0, verbose=0)
    p1 = result.mean_probabilities()[:, 0]
    two = np.stack([1 - p1, p1], axis=1)
    assert_figures(
        report.metrics["monte_carlo"], expected_classification(two, labels, 2)
    )

    model = tiny_model()
    one_hot = np.eye(3)[np.arange(12) % 3]
    by_index = keras_pvera.evaluate_uncertainty(
        model, x, np.arange(12) % 3, n=2, seed=0
    )
    by_rows = keras_pvera.evaluate_uncertainty(model, x, one_hot, n=2, seed=0)
    assert by_rows.task == "classification"
    for name in ("mean", "monte_carlo"):
        figures = dict(by_index.metrics[name])
        del figures["seconds_per_example"]  # Wall-clock: differs between runs.
        assert_figures(by_rows.metrics[name], figures)


@pytest.mark.parametrize("seed", SEEDS)
def test_regression_reports_gaussian_nll_interval_coverage_and_width(seed):
    model = tiny_model(units=1)
    x, x_far = data(), data(seed=1, scale=5.0)
    y = np.random.default_rng(seed).normal(size=12)  # Real values: regression.
    report = keras_pvera.evaluate_uncertainty(
        model, x, y, x_far, n=4, seed=seed, level=0.9
    )
    assert report.task == "regression" and report.curves == {}
    result = keras_pvera.predict_with_uncertainty(
        model, x, 4, seed=seed, level=0.9, verbose=0
    )
    far = keras_pvera.predict_with_uncertainty(model, x_far, 4, seed=seed, verbose=0)
    mean, std = result.mean[:, 0], np.maximum(result.std[:, 0], 1e-6)
    lower, upper = result.lower[:, 0], result.upper[:, 0]
    assert_figures(
        report.metrics["monte_carlo"],
        {
            "rmse": np.sqrt(np.mean((mean - y) ** 2)),
            "nll": np.mean(
                0.5 * np.log(2 * np.pi * std**2) + (y - mean) ** 2 / (2 * std**2)
            ),
            "coverage": np.mean((y >= lower) & (y <= upper)),
            "interval_width": np.mean(upper - lower),
            "auroc_std": ood_auroc(result.std[:, 0], far.std[:, 0]),
        },
    )
    # The mean predictor has no spread: its error only.
    figures = report.metrics["mean"]
    prediction = model.predict(x, verbose=0)[:, 0]
    assert figures["rmse"] == pytest.approx(np.sqrt(np.mean((prediction - y) ** 2)))
    assert figures["nll"] is figures["coverage"] is figures["interval_width"] is None
    assert "-" in str(report) and "central 90%" in str(report)
    with pytest.raises(ValueError, match="report is of a regression"):
        report.plot("never.png")


def test_integer_targets_of_a_linear_unit_are_a_regression_unless_told():
    model = tiny_model(units=1)
    x, y = data(), np.arange(12) % 4  # Counts, not 0/1 labels.
    assert keras_pvera.evaluate_uncertainty(model, x, y, n=2, seed=0).task == (
        "regression"
    )
    with pytest.raises(ValueError, match="class indices from 0 to 1"):
        keras_pvera.evaluate_uncertainty(
            model, x, y, n=2, seed=0, task="classification"
        )


def test_the_report_prints_a_table_and_plots_its_curves(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model()
    x, labels = data(), np.arange(12) % 3
    report = keras_pvera.evaluate_uncertainty(
        model, x, labels, data(seed=1, scale=5.0), n=2, seed=0, num_bins=10
    )
    text = str(report)
    assert "10 equal-width confidence bins" in text and "n=2, seed=0" in text
    header = [line for line in text.splitlines() if "monte_carlo" in line][0]
    assert header.split() == ["mean", "monte_carlo"]
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:]}
    assert rows["accuracy"][1] == f"{report.metrics['monte_carlo']['accuracy']:.4g}"
    assert rows["auroc_mi"][0] == "-"
    assert list(rows)[-1] == "seconds_per_example"
    path = str(tmp_path / "report.png")
    assert report.plot(path) == path
    with open(path, "rb") as file:
        assert file.read(4)[1:] == b"PNG"
    assert os.path.getsize(path) > 1000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(x=np.full((12, FEATURES), np.nan, "float32")), "`x` holds 48 NaN"),
        (dict(y=np.r_[np.nan, np.zeros(11)]), "`y` holds 1 NaN"),
        (
            dict(x_out_of_distribution=np.full((2, FEATURES), np.inf, "float32")),
            "`x_out_of_distribution` holds 8 NaN or infinite",
        ),
        (dict(y=np.zeros(11)), "`y` holds 11 labels, but `x` gives 12"),
        (dict(n=0), "`n` must be a positive integer. Received: n=0"),
        (dict(seed=-1), "`seed` must be None or a non-negative integer"),
        (dict(task="ranking"), "'classification' or 'regression'. Received: task="),
        (dict(num_bins=0), "`num_bins` must be a positive integer"),
        (dict(level=1.5), "strictly between 0 and 1"),
        (dict(from_logits="yes"), "`from_logits` must be None"),
    ],
    ids=[
        "nan_x",
        "nan_y",
        "infinite_ood",
        "fewer_labels",
        "n",
        "seed",
        "task",
        "num_bins",
        "level",
        "from_logits",
    ],
)
def test_bad_inputs_and_arguments_are_refused_naming_them(change, message):
    model = tiny_model()
    arguments = dict(x=data(), y=np.arange(12) % 3, n=2, seed=0)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        keras_pvera.evaluate_uncertainty(model, **arguments)


def test_a_model_with_several_outputs_is_refused():
    features = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(8, name="hidden")(features)
    base = keras.Model(features, [keras.layers.Dense(2)(hidden), hidden])
    model = keras_pvera.apply(base, rank=2, target=["hidden"])
    with pytest.raises(ValueError, match="one output .* returns 2"):
        keras_pvera.evaluate_uncertainty(model, data(), np.zeros(12), n=2, seed=0)


def test_a_class_per_position_is_refused_rather_than_read_as_real_values():
    features = keras.Input((3, FEATURES))
    hidden = keras.layers.Dense(8, name="hidden")(features)
    base = keras.Model(features, keras.layers.Dense(2)(hidden))
    model = keras_pvera.apply(base, rank=2, target=["hidden"])
    x = np.zeros((5, 3, FEATURES), "float32")
    with pytest.raises(ValueError, match=r"predicts \(3, 2\) per example"):
        keras_pvera.evaluate_uncertainty(model, x, np.zeros((5, 3)), n=2, seed=0)
