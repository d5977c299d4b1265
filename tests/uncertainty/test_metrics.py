"""Calibration (expected calibration error, reliability diagrams) and the
other metrics of uncertainty: NLL, Brier, risk-coverage, AUROC.

Run: PYTHONPATH=. KERAS_BACKEND=torch python -m pytest tests/test_metrics.py
"""

import sys

import keras
import numpy as np
import pytest

import keras_pvera
from keras_pvera.src.uncertainty.metrics import ExpectedCalibrationError
from keras_pvera.src.uncertainty.metrics import area_under_risk_coverage
from keras_pvera.src.uncertainty.metrics import auroc
from keras_pvera.src.uncertainty.metrics import brier_score
from keras_pvera.src.uncertainty.metrics import expected_calibration_error
from keras_pvera.src.uncertainty.metrics import gaussian_negative_log_likelihood
from keras_pvera.src.uncertainty.metrics import negative_log_likelihood
from keras_pvera.src.uncertainty.metrics import reliability_diagram
from keras_pvera.src.uncertainty.metrics import risk_coverage_curve

# Five predictions, five bins of width 0.2 (no confidence on a bin edge):
#   confidence 0.92, right  -> bin 4      bin 4: weight 2, right 1, conf 1.75
#   confidence 0.83, wrong  -> bin 4      bin 3: weight 1, right 1, conf 0.65
#   confidence 0.65, right  -> bin 3      bin 2: weight 2, right 1, conf 1.13
#   confidence 0.55, wrong  -> bin 2
#   confidence 0.58, right  -> bin 2
# ECE = (|1 - 1.75| + |1 - 0.65| + |1 - 1.13|) / 5 = 1.23 / 5 = 0.246
LABELS = np.array([0, 0, 1, 1, 1])
PROBABILITIES = np.array(
    [[0.92, 0.08], [0.17, 0.83], [0.35, 0.65], [0.55, 0.45], [0.42, 0.58]]
)
HAND_COMPUTED_ECE = 0.246


def as_float(value):
    return float(keras.ops.convert_to_numpy(value))


def test_ece_equals_the_hand_computed_case():
    ece = expected_calibration_error(LABELS, PROBABILITIES, num_bins=5)
    assert as_float(ece) == pytest.approx(HAND_COMPUTED_ECE, abs=1e-6)
    one_hot = np.eye(2)[LABELS]
    ece = expected_calibration_error(one_hot, PROBABILITIES, num_bins=5)
    assert as_float(ece) == pytest.approx(HAND_COMPUTED_ECE, abs=1e-6)
    column = LABELS[:, None]
    ece = expected_calibration_error(column, PROBABILITIES, num_bins=5)
    assert as_float(ece) == pytest.approx(HAND_COMPUTED_ECE, abs=1e-6)


def test_ece_of_single_unit_binary_probabilities():
    # p(class 1) 0.85 (label 1: right, conf 0.85, bin 4),
    # 0.30 (label 1: predicts 0, wrong, conf 0.70, bin 3),
    # 0.62 (label 0: predicts 1, wrong, conf 0.62, bin 3).
    # ECE = (|1 - 0.85| + |0 - 1.32|) / 3 = 0.49
    labels = np.array([1, 1, 0])
    p = np.array([0.85, 0.30, 0.62])
    for y_prob in (p, p[:, None]):
        ece = expected_calibration_error(labels, y_prob, num_bins=5)
        assert as_float(ece) == pytest.approx(0.49, abs=1e-6)


def test_perfect_and_worst_calibration():
    labels = np.array([0, 1, 2])
    assert as_float(expected_calibration_error(labels, np.eye(3))) == 0.0
    wrong = np.eye(3)[[1, 2, 0]]
    assert as_float(expected_calibration_error(labels, wrong)) == pytest.approx(1.0)


def test_functions_return_python_floats_and_numpy_arrays():
    ece = expected_calibration_error(LABELS, PROBABILITIES, num_bins=5)
    assert type(ece) is float
    assert ece == pytest.approx(HAND_COMPUTED_ECE, abs=1e-6)
    # Backend tensors in, a float out.
    tensor_ece = expected_calibration_error(
        keras.ops.convert_to_tensor(LABELS),
        keras.ops.convert_to_tensor(PROBABILITIES),
        num_bins=5,
    )
    assert type(tensor_ece) is float and tensor_ece == pytest.approx(ece)
    bins = keras_pvera.calibration_bins(LABELS, PROBABILITIES, num_bins=5)
    assert all(isinstance(b, np.ndarray) and b.shape == (5,) for b in bins)
    # The Keras metric keeps Keras metric semantics: a scalar tensor.
    metric = ExpectedCalibrationError(num_bins=5)
    metric.update_state(LABELS, PROBABILITIES)
    assert keras.ops.is_tensor(metric.result())


def test_logits_are_refused_and_mean_probabilities_are_right(tmp_path):
    rng = np.random.default_rng(0)
    logits = 2.0 * rng.normal(size=(6, 5, 3))  # 6 passes, 5 examples
    labels = np.array([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*softmax"):
        expected_calibration_error(labels, logits.mean(axis=0))
    with pytest.raises(ValueError, match="mean_probabilities"):
        reliability_diagram(labels, logits.mean(axis=0), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match=r"rows of 3 classes summing to"):
        expected_calibration_error(labels, np.full((5, 3), 0.5))
    result = keras_pvera.UncertaintyResult(logits, from_logits=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    assert expected_calibration_error(
        labels, result.mean_probabilities()
    ) == pytest.approx(expected_calibration_error(labels, p.mean(axis=0)))


def test_metric_accumulates_batches_and_resets():
    metric = ExpectedCalibrationError(num_bins=5)
    metric.update_state(LABELS[:2], PROBABILITIES[:2])
    metric.update_state(LABELS[2:], PROBABILITIES[2:])
    assert as_float(metric.result()) == pytest.approx(HAND_COMPUTED_ECE, abs=1e-6)
    metric.reset_state()
    assert as_float(metric.result()) == 0.0


def test_metric_sample_weights():
    # Weight 2 on the first prediction: bin 4 has weight 3, right 2,
    # confidence 2 * 0.92 + 0.83 = 2.67; total weight 6.
    # ECE = (|2 - 2.67| + 0.35 + 0.13) / 6 = 1.15 / 6
    metric = ExpectedCalibrationError(num_bins=5)
    weights = np.array([2.0, 1.0, 1.0, 1.0, 1.0])
    metric.update_state(LABELS, PROBABILITIES, sample_weight=weights)
    assert as_float(metric.result()) == pytest.approx(1.15 / 6, abs=1e-6)
    metric.reset_state()
    metric.update_state(LABELS, PROBABILITIES, sample_weight=weights[:, None])
    assert as_float(metric.result()) == pytest.approx(1.15 / 6, abs=1e-6)


def test_metric_in_compile_matches_the_function():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.integers(0, 3, size=40)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="softmax")]
    )
    model.compile(
        loss="sparse_categorical_crossentropy",
        metrics=[ExpectedCalibrationError(num_bins=10)],
    )
    logs = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    expected = expected_calibration_error(y, model.predict(x, verbose=0), num_bins=10)
    assert logs["expected_calibration_error"] == pytest.approx(
        as_float(expected), abs=1e-5
    )
    assert logs["expected_calibration_error"] > 0


def test_metric_config_round_trip():
    metric = ExpectedCalibrationError(num_bins=7, name="ece")
    config = metric.get_config()
    assert config["num_bins"] == 7 and config["name"] == "ece"
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric)
    )
    assert isinstance(restored, ExpectedCalibrationError)
    assert restored.num_bins == 7 and restored.name == "ece"
    assert keras_pvera.ExpectedCalibrationError is ExpectedCalibrationError


@pytest.mark.parametrize("num_bins", [0, -2, 2.5, True])
def test_bad_num_bins(num_bins, tmp_path):
    with pytest.raises(ValueError, match=f"num_bins={num_bins}"):
        expected_calibration_error(LABELS, PROBABILITIES, num_bins=num_bins)
    with pytest.raises(ValueError, match=f"num_bins={num_bins}"):
        ExpectedCalibrationError(num_bins=num_bins)
    with pytest.raises(ValueError, match=f"num_bins={num_bins}"):
        reliability_diagram(
            LABELS, PROBABILITIES, tmp_path / "x.png", num_bins=num_bins
        )


def test_reliability_diagram_writes_a_png(tmp_path):
    path = tmp_path / "reliability.png"
    returned = reliability_diagram(LABELS, PROBABILITIES, path, num_bins=5)
    assert returned == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_reliability_diagram_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"keras-pvera\[plot\]"):
        reliability_diagram(LABELS, PROBABILITIES, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# The metrics `evaluate_uncertainty` reports, each against an independent
# computation (scikit-learn's, or a plain loop) on small known inputs.

# Four examples, three classes: confidences 0.6, 0.6 (a tie), 0.5, 0.8;
# the first tie is right, the second wrong; the third predicts class 0
# (its first tied class) against label 2.
TIED_LABELS = np.array([0, 2, 2, 1])
TIED_PROBABILITIES = np.array(
    [[0.6, 0.3, 0.1], [0.6, 0.2, 0.2], [0.5, 0.0, 0.5], [0.1, 0.8, 0.1]]
)


def naive_aurc(labels, probabilities, order):
    """AURC of one ranking, written as its definition: a loop over coverage."""
    errors = [np.argmax(probabilities[i]) != labels[i] for i in order]
    risks = [sum(errors[:k]) / k for k in range(1, len(order) + 1)]
    return sum(risks) / len(order)


def aurc_over_tie_orders(labels, probabilities):
    """The mean AURC over every ranking by confidence that orders ties
    differently (all permutations, filtered: small inputs only)."""
    import itertools

    confidence = probabilities.max(axis=1)
    rankings = [
        order
        for order in itertools.permutations(range(len(labels)))
        if all(
            confidence[a] >= confidence[b]
            for a, b in zip(order, order[1:], strict=False)
        )
    ]
    return np.mean([naive_aurc(labels, probabilities, o) for o in rankings])


def test_nll_equals_scikit_learn_log_loss_and_clips_zero_probabilities():
    from sklearn.metrics import log_loss

    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.25, 0.25, 0.5]])
    labels = np.array([0, 2, 2])
    expected = log_loss(labels, probabilities, labels=[0, 1, 2])
    assert negative_log_likelihood(labels, probabilities) == pytest.approx(expected)
    assert negative_log_likelihood(np.eye(3)[labels], probabilities) == (
        pytest.approx(expected)
    )
    # A label given probability 0 costs -log(1e-12), not infinity.
    assert negative_log_likelihood([1], [[1.0, 0.0]]) == pytest.approx(-np.log(1e-12))


def test_brier_equals_scikit_learn_unscaled_and_twice_the_binary_form():
    from sklearn.metrics import brier_score_loss

    expected = brier_score_loss(
        TIED_LABELS, TIED_PROBABILITIES, labels=[0, 1, 2], scale_by_half=False
    )
    assert brier_score(TIED_LABELS, TIED_PROBABILITIES) == pytest.approx(expected)
    # A single unit, the probability of class 1: two classes.
    p1, labels = np.array([0.9, 0.2, 0.6]), np.array([1, 0, 0])
    binary = brier_score_loss(labels, p1)  # mean((p1 - y)**2)
    assert brier_score(labels, p1[:, None]) == pytest.approx(2 * binary)


def test_aurc_is_the_mean_over_the_orders_of_tied_confidences():
    expected = aurc_over_tie_orders(TIED_LABELS, TIED_PROBABILITIES)
    actual = area_under_risk_coverage(TIED_LABELS, TIED_PROBABILITIES)
    assert actual == pytest.approx(expected)
    # Either order of the tie alone gives another figure: the tie matters.
    assert naive_aurc(TIED_LABELS, TIED_PROBABILITIES, [3, 0, 1, 2]) != (
        pytest.approx(expected)
    )
    coverage, risk = risk_coverage_curve(TIED_LABELS, TIED_PROBABILITIES)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    # Two of four wrong in all; the tie at 0.6 holds one error.
    np.testing.assert_allclose(risk, [0.0, 0.25, 1 / 3, 0.5])


def test_aurc_without_ties_equals_the_loop_and_bounds():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 3))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 3, size=7)
    order = np.argsort(-probabilities.max(axis=1))
    assert area_under_risk_coverage(labels, probabilities) == pytest.approx(
        naive_aurc(labels, probabilities, order)
    )
    right = probabilities.argmax(axis=1)
    assert area_under_risk_coverage(right, probabilities) == 0.0


def test_a_single_class_is_scored():
    labels = np.zeros(3, dtype=int)
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    assert negative_log_likelihood(labels, probabilities) == pytest.approx(
        -np.mean(np.log([0.9, 0.4, 0.7]))
    )
    assert brier_score(labels, probabilities) == pytest.approx(
        np.mean([2 * 0.1**2, 2 * 0.6**2, 2 * 0.3**2])
    )
    # The only error (confidence 0.6) is the least confident: AURC 0 + 0 + 1/3.
    assert area_under_risk_coverage(labels, probabilities) == pytest.approx(1 / 9)


def test_auroc_equals_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    inside = np.array([0.1, 0.4, 0.4, 0.2, 0.9])
    outside = np.array([0.4, 0.8, 0.1, 0.95])
    expected = roc_auc_score(np.r_[np.zeros(5), np.ones(4)], np.r_[inside, outside])
    assert auroc(inside, outside) == pytest.approx(expected)
    assert auroc([1.0, 1.0], [1.0]) == 0.5


def test_gaussian_nll_equals_the_formula_and_clips_zero_spread():
    y = np.array([0.5, -1.0, 2.0])
    mean = np.array([0.0, -1.5, 2.0])
    std = np.array([1.0, 0.5, 2.0])
    expected = np.mean(
        0.5 * np.log(2 * np.pi * std**2) + (y - mean) ** 2 / (2 * std**2)
    )
    assert gaussian_negative_log_likelihood(y, mean, std) == pytest.approx(expected)
    zero_spread = gaussian_negative_log_likelihood([0.0], [0.0], [0.0])
    assert zero_spread == pytest.approx(0.5 * np.log(2 * np.pi * 1e-12))


def test_ece_equals_a_loop_over_bins_on_edges_and_ties():
    # Confidences 0.5 (a tie of classes), 0.6 (on a bin edge of 5 bins),
    # 0.8, 0.8, 1.0: each bin m holds ((m - 1) / 5, m / 5].
    probabilities = np.array(
        [[0.5, 0.5], [0.4, 0.6], [0.8, 0.2], [0.2, 0.8], [1.0, 0.0]]
    )
    labels = np.array([1, 1, 0, 0, 0])
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == labels
    expected = 0.0
    for m in range(5):
        inside = (confidence > m / 5) & (confidence <= (m + 1) / 5 + 1e-12)
        if inside.any():
            gap = abs(right[inside].mean() - confidence[inside].mean())
            expected += inside.mean() * gap
    actual = expected_calibration_error(labels, probabilities, num_bins=5)
    assert actual == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "metric",
    [negative_log_likelihood, brier_score, area_under_risk_coverage],
)
def test_nan_and_mismatched_labels_are_refused(metric):
    probabilities = np.array([[0.7, 0.3], [0.4, 0.6]])
    with pytest.raises(ValueError, match="`y_true` holds 1 NaN"):
        metric(np.array([0, np.nan]), probabilities)
    with pytest.raises(ValueError, match="`y_prob` holds 1 NaN"):
        metric([0, 1], np.array([[0.7, 0.3], [np.nan, 0.6]]))
    with pytest.raises(ValueError, match=r"one label per example \(2\)"):
        metric([0, 1, 1], probabilities)
    with pytest.raises(ValueError, match="from 0 to 1.*Received labels from 0 to 2"):
        metric([0, 2], probabilities)
    with pytest.raises(ValueError, match="cannot|outside"):
        metric([0, 1], np.array([[2.0, -1.0], [0.4, 0.6]]))


def test_auroc_refuses_nan_and_empty_sets():
    with pytest.raises(ValueError, match="`out_of_distribution` holds 1 NaN"):
        auroc([0.1], [np.nan])
    with pytest.raises(ValueError, match="`in_distribution` needs at least one"):
        auroc([], [0.2])
