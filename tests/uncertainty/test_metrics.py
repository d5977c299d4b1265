"""Calibration: expected calibration error and reliability diagrams.

Run: PYTHONPATH=. KERAS_BACKEND=torch python -m pytest tests/test_metrics.py
"""

import sys

import keras
import numpy as np
import pytest

import keras_pvera
from keras_pvera.src.uncertainty.metrics import ExpectedCalibrationError
from keras_pvera.src.uncertainty.metrics import expected_calibration_error
from keras_pvera.src.uncertainty.metrics import reliability_diagram

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
