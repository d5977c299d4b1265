"""Metrics of predictive uncertainty: calibration, likelihood, selective
prediction and out-of-distribution ranking.

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

Beside the ECE, for probabilities and labels (`evaluate_uncertainty` reads
them all): `negative_log_likelihood`, `brier_score`, `risk_coverage_curve`
and `area_under_risk_coverage` (selective prediction), `auroc` of a score
separating out-of-distribution inputs, and, for real-valued outputs,
`gaussian_negative_log_likelihood`. These take and return NumPy values and
refuse NaN with a `ValueError`.

Example:

>>> import keras_pvera
>>> round(keras_pvera.expected_calibration_error(
...     [0, 1], [[0.9, 0.1], [0.4, 0.6]], num_bins=10), 6)
0.25
"""

import keras
import numpy as np
import scipy.stats
from keras import ops

from keras_pvera.src.uncertainty.statistics import probability_problem
from keras_pvera.src.utils import checks


def _check_num_bins(num_bins):
    return checks.checked_integer(num_bins, "num_bins")


def _check_probabilities(y_prob, what):
    """Raises a `ValueError` if `y_prob` cannot be class probabilities."""
    problem = probability_problem(ops.convert_to_numpy(y_prob))
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
    accuracy, mean_confidence, filled, ece = _reliability(y_true, y_prob, num_bins)
    figure = Figure(figsize=(4.5, 4.5))
    axes = figure.add_subplot()
    _draw_reliability(axes, accuracy, mean_confidence, filled)
    axes.set_title(f"Reliability diagram (ECE = {ece:.4f})")
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    return path


def _reliability(y_true, y_prob, num_bins):
    """`(accuracy, mean_confidence, filled, ece)`: per equal-width bin, the
    accuracy and mean confidence of its predictions (0 in an empty bin),
    whether it holds any, and the expected calibration error."""
    sums = _bin_sums(y_true, y_prob, num_bins)
    weights, confidences, correct = (ops.convert_to_numpy(t) for t in sums)
    ece = float(ops.convert_to_numpy(_error_from_bins(*sums)))
    filled = weights > 0
    accuracy = np.divide(correct, weights, out=np.zeros_like(correct), where=filled)
    mean_confidence = np.divide(
        confidences, weights, out=np.zeros_like(confidences), where=filled
    )
    return accuracy, mean_confidence, filled, ece


def _draw_reliability(axes, accuracy, mean_confidence, filled):
    """Draws the filled bins' accuracy as bars, their gap to the mean
    confidence shaded, beside the diagonal of perfect calibration."""
    width = 1.0 / len(accuracy)
    left_edges = np.arange(len(accuracy)) * width
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


# Smallest probability read as a log-probability: the negative log-likelihood
# of a label given probability 0 is `-log(1e-12)`, about 27.6, not infinity.
TINY_PROBABILITY = 1e-12
# Smallest standard deviation of the Gaussian NLL of regression samples: a
# prediction whose passes all agree gets a large finite NLL, not infinity.
MIN_STD = 1e-6


def checked_finite(values, name):
    """`values` as a NumPy array of numbers, or a `ValueError` naming `name`
    if it holds NaN or infinity, or is not numeric."""
    values = np.asarray(values)
    if values.dtype.kind in "fc" and not np.all(np.isfinite(values)):
        bad = int(np.sum(~np.isfinite(values)))
        raise ValueError(
            f"`{name}` holds {bad} NaN or infinite value(s) out of "
            f"{values.size}; every value must be finite."
        )
    if values.dtype.kind not in "biuf":
        raise ValueError(
            f"`{name}` must hold numbers. Received values of dtype {values.dtype}."
        )
    return values


def class_probabilities(y_prob, what):
    """Checked probabilities `(examples, classes)`; a single unit (`(batch,)`
    or `(batch, 1)`, the probability of class 1) becomes two classes."""
    y_prob = checked_finite(y_prob, "y_prob")
    _check_probabilities(y_prob, what)
    y_prob = y_prob.astype("float64")
    if y_prob.ndim == 1:
        y_prob = y_prob[:, None]
    if y_prob.ndim != 2:
        raise ValueError(
            f"`{what}` needs probabilities of shape (examples, classes). "
            f"Received shape {y_prob.shape}."
        )
    if y_prob.shape[-1] == 1:
        y_prob = np.concatenate([1.0 - y_prob, y_prob], axis=-1)
    return y_prob


def class_labels(y_true, num_examples, num_classes, name="y_true"):
    """Checked integer labels `(examples,)` from class indices (shape
    `(examples,)` or `(examples, 1)`) or one-hot rows.

    Raises:
        ValueError: For NaN, non-integer labels, labels outside
            `0..num_classes - 1`, or a number of labels other than
            `num_examples`, naming what was received.
    """
    y_true = checked_finite(y_true, name)
    if y_true.ndim == 2 and y_true.shape[1] == num_classes and num_classes > 1:
        if not np.all((y_true == 0) | (y_true == 1)) or not np.all(
            y_true.sum(axis=1) == 1
        ):
            raise ValueError(
                f"`{name}` of shape {y_true.shape} is read as one-hot rows, "
                "but not every row holds a single 1 and zeros elsewhere."
            )
        y_true = np.argmax(y_true, axis=1)
    elif y_true.ndim == 2 and y_true.shape[1] == 1:
        y_true = y_true[:, 0]
    if y_true.ndim != 1 or y_true.shape[0] != num_examples:
        raise ValueError(
            f"`{name}` must hold one label per example ({num_examples}): class "
            f"indices of shape ({num_examples},) or one-hot rows of shape "
            f"({num_examples}, {num_classes}). Received shape {y_true.shape}."
        )
    if not np.all(np.mod(y_true, 1) == 0):
        raise ValueError(
            f"`{name}` must hold integer class indices. Received non-integer "
            f"values such as {y_true[np.mod(y_true, 1) != 0][0]!r}."
        )
    y_true = y_true.astype("int64")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= num_classes):
        raise ValueError(
            f"`{name}` must hold class indices from 0 to {num_classes - 1} "
            f"({num_classes} classes). Received labels from {y_true.min()} to "
            f"{y_true.max()}."
        )
    return y_true


def _labels_and_probabilities(y_true, y_prob, what):
    y_prob = class_probabilities(y_prob, what)
    return class_labels(y_true, y_prob.shape[0], y_prob.shape[1]), y_prob


def negative_log_likelihood_of(labels, y_prob):
    """`negative_log_likelihood` on checked labels and probabilities."""
    picked = y_prob[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, TINY_PROBABILITY, 1.0))))


def negative_log_likelihood(y_true, y_prob):
    """The mean negative log-likelihood of the labels, in nats.

    `-mean(log(p[label]))`, each probability clipped below at
    `TINY_PROBABILITY` (1e-12), so a label given probability 0 costs about
    27.6 rather than infinity.

    Args:
        y_true: Class indices `(examples,)` or one-hot rows.
        y_prob: Class probabilities `(examples, classes)`; a single unit is
            the probability of class 1.

    Returns:
        A float.

    Raises:
        ValueError: For NaN, values that cannot be probabilities, or labels
            that do not match.

    Example:

    >>> round(negative_log_likelihood([0, 1], [[0.5, 0.5], [0.0, 1.0]]), 6)
    0.346574
    """
    labels, y_prob = _labels_and_probabilities(
        y_true, y_prob, "negative_log_likelihood"
    )
    return negative_log_likelihood_of(labels, y_prob)


def brier_score(y_true, y_prob):
    """The Brier score: `mean over examples of sum over classes of
    (p - one_hot(label))**2`, from 0 (right with certainty) to 2.

    A single unit is read as two classes, so a binary problem scores twice
    the one-column form `mean((p1 - y)**2)`.

    Args:
        y_true: Class indices `(examples,)` or one-hot rows.
        y_prob: Class probabilities `(examples, classes)`.

    Returns:
        A float.

    Example:

    >>> round(brier_score([0], [[0.75, 0.25]]), 6)
    0.125
    """
    labels, y_prob = _labels_and_probabilities(y_true, y_prob, "brier_score")
    one_hot = np.eye(y_prob.shape[1])[labels]
    return float(np.mean(np.sum(np.square(y_prob - one_hot), axis=1)))


def risk_coverage_curve(y_true, y_prob):
    """The risk (error rate) of the most confident predictions, by coverage.

    Predictions are ranked by confidence, the predicted class's probability
    (the first of tied classes). Keeping the `k` most confident of `N`
    covers `k / N` of them, at the risk `errors among them / k`. Where
    confidences tie, no order among the tied predictions is better founded
    than another: the curve takes the mean over their orders, so the
    errors of a tied group count in proportion to how much of it is kept.

    Args:
        y_true: Class indices `(examples,)` or one-hot rows.
        y_prob: Class probabilities `(examples, classes)`.

    Returns:
        A tuple `(coverage, risk)` of float64 arrays of shape `(examples,)`:
        coverage `1/N, 2/N, ..., 1` and the risk there.

    Example:

    >>> coverage, risk = risk_coverage_curve(
    ...     [0, 1, 1], [[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]])
    >>> risk.round(3).tolist()
    [0.0, 0.5, 0.333]
    """
    labels, y_prob = _labels_and_probabilities(y_true, y_prob, "risk_coverage_curve")
    return _risk_coverage(labels, y_prob)


def _risk_coverage(labels, y_prob):
    count = len(labels)
    if count == 0:
        raise ValueError("A risk-coverage curve needs at least one prediction.")
    confidence = np.max(y_prob, axis=1)
    errors = (np.argmax(y_prob, axis=1) != labels).astype("float64")
    order = np.argsort(-confidence, kind="stable")
    confidence, errors = confidence[order], errors[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(confidence) != 0) + 1])
    sizes = np.diff(np.concatenate([starts, [count]]))
    before = np.concatenate([[0.0], np.cumsum(errors)])[starts]
    in_group = np.add.reduceat(errors, starts)
    group = np.repeat(np.arange(len(starts)), sizes)
    kept = np.arange(count) - starts[group] + 1.0
    cumulative = before[group] + kept / sizes[group] * in_group[group]
    covered = np.arange(1, count + 1, dtype="float64")
    return covered / count, cumulative / covered


def area_under_risk_coverage(y_true, y_prob):
    """AURC: the mean of `risk_coverage_curve`'s risk over its `N` coverages.

    The area under the risk-coverage curve as Geifman et al. (2018) compute
    it, `(1/N) sum_k risk(k/N)`: 0 when every error is less confident than
    every right prediction (or there is none), up to the error rate when
    the confidence ranks errors first. Lower is better.

    Args:
        y_true: Class indices `(examples,)` or one-hot rows.
        y_prob: Class probabilities `(examples, classes)`.

    Returns:
        A float.

    Example:

    >>> round(area_under_risk_coverage(
    ...     [0, 1, 1], [[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]]), 6)
    0.277778
    """
    labels, y_prob = _labels_and_probabilities(
        y_true, y_prob, "area_under_risk_coverage"
    )
    return float(np.mean(_risk_coverage(labels, y_prob)[1]))


def auroc(in_distribution, out_of_distribution):
    """How well a score ranks out-of-distribution inputs above the others.

    `P(out > in) + P(out == in) / 2` over all pairs, from SciPy's
    Mann-Whitney U statistic: 1 when every out-of-distribution score is
    higher, 0.5 for chance (or all scores tied), 0 when inverted.

    Args:
        in_distribution: Scores of in-distribution inputs, shape `(N,)`.
        out_of_distribution: Scores of out-of-distribution inputs `(M,)`.

    Returns:
        A float in `[0, 1]`.

    Raises:
        ValueError: If a set is empty or holds NaN.

    Example:

    >>> auroc([0.1, 0.2], [0.3, 0.2])
    0.875
    """
    scores = []
    for values, name in (
        (in_distribution, "in_distribution"),
        (out_of_distribution, "out_of_distribution"),
    ):
        values = checked_finite(values, name).reshape(-1).astype("float64")
        if values.size == 0:
            raise ValueError(f"`{name}` needs at least one score. Received none.")
        scores.append(values)
    inside, outside = scores
    u = scipy.stats.mannwhitneyu(outside, inside).statistic
    return float(u / (inside.size * outside.size))


def gaussian_negative_log_likelihood(y_true, mean, std):
    """Mean negative log-likelihood of real values under `N(mean, std**2)`.

    Each value's Gaussian has the mean and standard deviation of its
    samples; `std` is clipped below at `MIN_STD` (1e-6), so samples that
    all agree give a large finite value rather than infinity. In nats, per
    value (averaged over every value of `y_true`).

    Args:
        y_true: Real targets.
        mean: Predicted means, shaped like `y_true`.
        std: Predicted standard deviations, shaped like `y_true`.

    Returns:
        A float.

    Example:

    >>> round(gaussian_negative_log_likelihood([0.0], [0.0], [1.0]), 6)
    0.918939
    """
    y_true = checked_finite(y_true, "y_true").astype("float64")
    mean = checked_finite(mean, "mean").astype("float64")
    std = np.maximum(checked_finite(std, "std").astype("float64"), MIN_STD)
    return float(-np.mean(scipy.stats.norm.logpdf(y_true, loc=mean, scale=std)))
