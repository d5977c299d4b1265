"""Metrics of calibration: expected calibration error and reliability diagrams.

A classifier is calibrated when, among the predictions it makes with
confidence `c`, a fraction `c` is right. The expected calibration error
(ECE, Guo et al. 2017) measures the gap: predictions are put in `num_bins`
equal-width bins of confidence (the highest class probability; bin `m` holds
confidences in `((m - 1) / num_bins, m / num_bins]`), and

    ECE = sum over bins of (weight of bin / total weight)
                         * |accuracy in bin - mean confidence in bin|

Labels may be integer class indices (shape `(batch, ...)` or
`(batch, ..., 1)`) or one-hot (shape of `y_prob`). Probabilities of shape
`(batch, ..., classes)`; a single unit (`(batch, ..., 1)` or `(batch,)`) is
read as the probability of class 1 of a binary problem. The functions take
probabilities only, and raise a `ValueError` for values that cannot be
(logits): pass `result.mean_probabilities()` of a Monte Carlo result, which
reads logits or probabilities as the model outputs them. They return Python
floats and NumPy arrays; the `ExpectedCalibrationError` metric returns
tensors, as Keras metrics do.

Example:

>>> import keras_pvera
>>> round(keras_pvera.expected_calibration_error(
...     [0, 1], [[0.9, 0.1], [0.4, 0.6]], num_bins=10), 6)
0.25
"""

import keras
import numpy as np
from keras import ops

from keras_pvera.src.uncertainty import output_kinds
from keras_pvera.src.utils import checks


def _check_num_bins(num_bins):
    return checks.checked_integer(num_bins, "num_bins")


def _check_probabilities(y_prob, what):
    """Raises a `ValueError` if `y_prob` cannot be class probabilities."""
    problem = output_kinds.probability_problem(ops.convert_to_numpy(y_prob))
    if problem is not None:
        raise ValueError(
            f"`{what}` needs class probabilities in `y_prob`, but it holds "
            f"{problem}. For logits, pass `keras.ops.softmax(logits)` (or "
            "`keras.ops.sigmoid` of a single unit); for a Monte Carlo result, "
            "pass `result.mean_probabilities()`."
        )


def calibration_bins(y_true, y_prob, num_bins=15, sample_weight=None):
    """Per-bin sums of weight, confidence and correctness.

    Args:
        y_true: Class indices or one-hot labels.
        y_prob: Class probabilities.
        num_bins: Number of equal-width confidence bins.
        sample_weight: Optional weights, broadcastable to the labels' shape
            `y_prob.shape[:-1]`.

    Returns:
        A tuple `(weights, confidences, correct)` of float32 NumPy arrays of
        shape `(num_bins,)`: the total weight of the predictions in each
        bin, and the weighted sums of their confidences and of their
        correctness (1 when the most probable class is the label).

    Raises:
        ValueError: If `num_bins` is not a positive integer, or `y_prob`
            holds values that cannot be probabilities.

    Example:

    >>> weights, confidences, correct = calibration_bins(
    ...     [0, 1], [[0.9, 0.1], [0.7, 0.3]], num_bins=2)
    >>> weights, correct
    (array([0., 2.], dtype=float32), array([0., 1.], dtype=float32))
    """
    num_bins = _check_num_bins(num_bins)
    _check_probabilities(y_prob, "calibration_bins")
    sums = _bin_sums(y_true, y_prob, num_bins, sample_weight)
    return tuple(ops.convert_to_numpy(t) for t in sums)


def _bin_sums(y_true, y_prob, num_bins, sample_weight=None):
    """`calibration_bins` as tensors, unchecked: it runs in compiled steps."""
    y_prob = ops.convert_to_tensor(y_prob, dtype="float32")
    y_true = ops.convert_to_tensor(y_true)
    if len(y_prob.shape) == 1:
        y_prob = ops.expand_dims(y_prob, -1)
    prediction_shape = ops.shape(y_prob)[:-1]
    num_classes = y_prob.shape[-1]
    one_hot = (
        num_classes > 1
        and len(y_true.shape) == len(y_prob.shape)
        and y_true.shape[-1] == num_classes
    )
    if one_hot:
        labels = ops.argmax(y_true, axis=-1)
    else:
        labels = ops.reshape(y_true, prediction_shape)
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    y_prob = ops.reshape(y_prob, (-1, num_classes))
    if num_classes == 1:
        y_prob = ops.concatenate([1.0 - y_prob, y_prob], axis=-1)
    confidence = ops.max(y_prob, axis=-1)
    predicted = ops.cast(ops.argmax(y_prob, axis=-1), "int32")
    correct = ops.cast(ops.equal(predicted, labels), "float32")
    bins = ops.cast(ops.ceil(confidence * num_bins), "int32") - 1
    bins = ops.clip(bins, 0, num_bins - 1)
    if sample_weight is None:
        weight = ops.ones_like(confidence)
    else:
        weight = _weight_per_prediction(sample_weight, prediction_shape)
    membership = ops.one_hot(bins, num_bins, dtype="float32") * weight[:, None]
    return (
        ops.sum(membership, axis=0),
        ops.sum(membership * confidence[:, None], axis=0),
        ops.sum(membership * correct[:, None], axis=0),
    )


def _weight_per_prediction(sample_weight, prediction_shape):
    """Sample weights broadcast to `prediction_shape`, then flattened."""
    weight = ops.convert_to_tensor(sample_weight, dtype="float32")
    rank = len(prediction_shape)
    # (batch, 1) weights for (batch,) predictions: drop the unit axes.
    while len(weight.shape) > rank and weight.shape[-1] == 1:
        weight = ops.squeeze(weight, axis=-1)
    while len(weight.shape) < rank:
        weight = ops.expand_dims(weight, -1)
    return ops.reshape(ops.broadcast_to(weight, prediction_shape), (-1,))


def _error_from_bins(weights, confidences, correct):
    """ECE from `calibration_bins`' sums; 0 when the total weight is 0."""
    gaps = ops.sum(ops.abs(correct - confidences))
    return ops.divide_no_nan(gaps, ops.sum(weights))


def expected_calibration_error(y_true, y_prob, num_bins=15):
    """The expected calibration error of class probabilities.

    Args:
        y_true: Integer class labels, shape `(batch, ...)` or
            `(batch, ..., 1)`, or one-hot labels shaped like `y_prob`.
        y_prob: Class probabilities, shape `(batch, ..., classes)`; a single
            unit is the probability of class 1.
        num_bins: Number of equal-width confidence bins (15, as Guo et al.).

    Returns:
        A Python float in `[0, 1]`.

    Raises:
        ValueError: If `num_bins` is not a positive integer, or `y_prob`
            holds values that cannot be probabilities (such as logits).

    Example:

    >>> round(expected_calibration_error(
    ...     [0, 1], [[0.9, 0.1], [0.7, 0.3]], num_bins=10), 6)
    0.4
    """
    num_bins = _check_num_bins(num_bins)
    _check_probabilities(y_prob, "expected_calibration_error")
    sums = _bin_sums(y_true, y_prob, num_bins)
    return float(ops.convert_to_numpy(_error_from_bins(*sums)))


@keras.saving.register_keras_serializable(package="keras_pvera")
class ExpectedCalibrationError(keras.metrics.Metric):
    """Expected calibration error, accumulated over batches.

    Keeps per-bin sums of weight, confidence and correctness across
    `update_state` calls, so the result over many batches equals
    `expected_calibration_error` over all of them at once. Use it in
    `compile(metrics=[...])` for a model that outputs class probabilities.

    Args:
        num_bins: Number of equal-width confidence bins.
        name: Name of the metric.
        dtype: Dtype of the result.

    Returns:
        A `keras.metrics.Metric`; its `result()` is a scalar tensor, the
        ECE of every batch given to `update_state` since the last
        `reset_state`.

    Raises:
        ValueError: If `num_bins` is not a positive integer.

    Example:

    >>> metric = ExpectedCalibrationError(num_bins=10)
    >>> metric.update_state([0], [[0.9, 0.1]])
    >>> metric.update_state([1], [[0.7, 0.3]])
    >>> round(float(metric.result()), 6)
    0.4
    """

    def __init__(self, num_bins=15, name="expected_calibration_error", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_bins = _check_num_bins(num_bins)
        self.bin_weights = self.add_variable(
            shape=(self.num_bins,), initializer="zeros", name="bin_weights"
        )
        self.bin_confidences = self.add_variable(
            shape=(self.num_bins,), initializer="zeros", name="bin_confidences"
        )
        self.bin_correct = self.add_variable(
            shape=(self.num_bins,), initializer="zeros", name="bin_correct"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch of labels and predicted probabilities.

        Args:
            y_true: Class indices or one-hot labels.
            y_pred: Class probabilities.
            sample_weight: Optional weights, as for `calibration_bins`.
        """
        weights, confidences, correct = _bin_sums(
            y_true, y_pred, self.num_bins, sample_weight=sample_weight
        )
        self.bin_weights.assign_add(ops.cast(weights, self.bin_weights.dtype))
        self.bin_confidences.assign_add(
            ops.cast(confidences, self.bin_confidences.dtype)
        )
        self.bin_correct.assign_add(ops.cast(correct, self.bin_correct.dtype))

    def result(self):
        """The expected calibration error so far, a scalar tensor."""
        return ops.cast(
            _error_from_bins(self.bin_weights, self.bin_confidences, self.bin_correct),
            self.dtype,
        )

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "num_bins": self.num_bins}


def reliability_diagram(y_true, y_prob, path, num_bins=15):
    """Writes a reliability diagram (accuracy against confidence) as a PNG.

    One bar per confidence bin, as high as the accuracy of its predictions,
    beside the diagonal of perfect calibration; the gap to the diagonal is
    shaded and the expected calibration error is in the title. Needs
    matplotlib: `pip install "keras-pvera[plot]"`.

    Args:
        y_true: Labels, as for `expected_calibration_error`.
        y_prob: Class probabilities, as for `expected_calibration_error`.
        path: Where to write the PNG file (a string or path-like).
        num_bins: Number of equal-width confidence bins.

    Returns:
        `path`.

    Raises:
        ImportError: If matplotlib is not installed.
        ValueError: If `num_bins` is not a positive integer, or `y_prob`
            holds values that cannot be probabilities.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "reliability.png")
    >>> reliability_diagram([0, 1, 1], [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]],
    ...                     path) == path
    True
    >>> open(path, "rb").read(4)[1:] == b"PNG"
    True
    """
    num_bins = _check_num_bins(num_bins)
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "reliability_diagram needs matplotlib, an optional dependency of "
            'keras-pvera: install it with `pip install "keras-pvera[plot]"` '
            "(or `pip install matplotlib`)."
        ) from e
    _check_probabilities(y_prob, "reliability_diagram")
    sums = _bin_sums(y_true, y_prob, num_bins)
    weights, confidences, correct = (ops.convert_to_numpy(t) for t in sums)
    ece = float(ops.convert_to_numpy(_error_from_bins(*sums)))
    filled = weights > 0
    accuracy = np.divide(correct, weights, out=np.zeros_like(correct), where=filled)
    mean_confidence = np.divide(
        confidences, weights, out=np.zeros_like(confidences), where=filled
    )
    width = 1.0 / num_bins
    left_edges = np.arange(num_bins) * width

    figure = Figure(figsize=(4.5, 4.5))
    axes = figure.add_subplot()
    axes.bar(
        left_edges[filled],
        accuracy[filled],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="accuracy",
    )
    gap_bottom = np.minimum(accuracy, mean_confidence)[filled]
    axes.bar(
        left_edges[filled],
        np.abs(mean_confidence - accuracy)[filled],
        bottom=gap_bottom,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap",
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="calibrated")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(f"Reliability diagram (ECE = {ece:.4f})")
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    return path
