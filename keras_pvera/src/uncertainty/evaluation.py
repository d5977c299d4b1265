"""Uncertainty measured as the field reports it, predictor beside predictor.

`evaluate_uncertainty` predicts labelled inputs (and, if given, inputs
unlike them) with a PVeRA model in each of its ways, and scores each:

- `"mean"`: one pass with sampling off (every latent code at its mean);
- `"monte_carlo"`: the mean of `n` sampled passes, exactly the prediction
  of `predict_with_uncertainty(model, x, n, seed=seed)`;
- `"mean_calibrated"`, `"monte_carlo_calibrated"`: the same passes tempered
  by the model's calibration temperature (`keras_pvera.calibrate`), when it
  has one.

Classifiers are scored on accuracy, negative log-likelihood, Brier score,
expected calibration error, the area under the risk-coverage curve and,
with out-of-distribution inputs, the AUROC of the scores that tell them
apart; regressors on the error of the mean, the Gaussian NLL of the
samples and the coverage and width of their intervals. Every predictor's
cost is its wall-clock seconds per example. The definitions are those of
`keras_pvera.src.uncertainty.metrics`.
"""

import time

import keras
import numpy as np
from keras import ops

from keras_pvera.src.uncertainty import metrics
from keras_pvera.src.uncertainty import output_kinds
from keras_pvera.src.uncertainty.monte_carlo import drawn_seed
from keras_pvera.src.uncertainty.monte_carlo import predict_with_uncertainty
from keras_pvera.src.uncertainty.sampled_model import read_model
from keras_pvera.src.uncertainty.sampling_state import sampling_off
from keras_pvera.src.uncertainty.statistics import UncertaintyResult
from keras_pvera.src.uncertainty.statistics import check_level
from keras_pvera.src.uncertainty.temperature_scaling import apply_temperature
from keras_pvera.src.uncertainty.temperature_scaling import calibration_set_aside
from keras_pvera.src.utils import checks

TASKS = ("classification", "regression")
CLASSIFICATION_METRICS = ("accuracy", "nll", "brier", "ece", "aurc")
REGRESSION_METRICS = ("rmse", "nll", "coverage", "interval_width")


class UncertaintyReport:
    """What `evaluate_uncertainty` measured, one column per predictor.

    `print(report)` shows the table; `report.plot(path)` draws the
    reliability and risk-coverage curves of a classifier.

    Attributes:
        task: `"classification"` or `"regression"`.
        metrics: `{predictor: {metric: value}}`, predictors in the order
            `"mean"`, `"monte_carlo"`, and, for a calibrated model,
            `"mean_calibrated"`, `"monte_carlo_calibrated"`. Values are
            floats, or `None` where a predictor has no such figure (the
            mean predictor of a regressor has no spread). Every predictor
            has `"seconds_per_example"`.
        curves: `{predictor: {"reliability": (weights, confidences,
            correct), "risk_coverage": (coverage, risk)}}` for a
            classifier (`calibration_bins` sums and `risk_coverage_curve`
            arrays); empty for a regressor.
        n: Monte Carlo passes.
        seed: The seed of every Monte Carlo run (drawn when `None` was
            given, so the run can be repeated).
        num_bins: Equal-width confidence bins of the ECE.
        level: Level of the regression intervals.
        temperature: The calibration temperature, or `None`.
        num_examples: Labelled examples scored.
        num_out_of_distribution: Out-of-distribution inputs, or 0.
    """

    def __init__(self, task, metrics, curves, settings):
        self.task = task
        self.metrics = metrics
        self.curves = curves
        self.n = settings["n"]
        self.seed = settings["seed"]
        self.num_bins = settings["num_bins"]
        self.level = settings["level"]
        self.temperature = settings["temperature"]
        self.num_examples = settings["num_examples"]
        self.num_out_of_distribution = settings["num_out_of_distribution"]

    @property
    def predictors(self):
        """The predictors scored, in the table's order."""
        return list(self.metrics)

    def __repr__(self):
        return (
            f"UncertaintyReport(task={self.task!r}, predictors={self.predictors}, "
            f"n={self.n}, seed={self.seed})"
        )

    def _heading(self):
        ood = (
            f" (+ {self.num_out_of_distribution} out of distribution)"
            if self.num_out_of_distribution
            else ""
        )
        lines = [
            f"Uncertainty of a {self.task} on {self.num_examples} examples{ood}; "
            f"Monte Carlo: n={self.n}, seed={self.seed}."
        ]
        if self.task == "classification":
            lines.append(
                f"ECE over {self.num_bins} equal-width confidence bins; AURC: "
                "mean risk over coverage, confidence = the predicted class's "
                "probability; NLL in nats."
            )
        else:
            lines.append(
                f"Intervals: the samples' central {self.level:.0%}; NLL: "
                "Gaussian of the samples' mean and std, in nats per value. "
                "The mean predictor has no spread: '-'."
            )
        if self.temperature is not None:
            lines.append(f"Calibration temperature: {self.temperature:.4g}.")
        return lines

    def __str__(self):
        names = []
        for row in self.metrics.values():
            names.extend(name for name in row if name not in names)
        names.remove("seconds_per_example")  # The cost, last.
        names.append("seconds_per_example")
        width = max(len(name) for name in names)
        columns = [max(12, len(p)) for p in self.predictors]
        header = " ".join(
            [" " * width]
            + [p.rjust(c) for p, c in zip(self.predictors, columns, strict=True)]
        )
        lines = self._heading() + [header]
        for name in names:
            cells = [name.ljust(width)]
            for predictor, column in zip(self.predictors, columns, strict=True):
                value = self.metrics[predictor].get(name)
                text = "-" if value is None else f"{value:.4g}"
                cells.append(text.rjust(column))
            lines.append(" ".join(cells))
        return "\n".join(lines)

    def plot(self, path):
        """Writes a classifier's reliability and risk-coverage curves as a PNG.

        Left: accuracy against mean confidence in each filled bin, per
        predictor, beside the diagonal of perfect calibration. Right: risk
        against coverage, per predictor (lower is better). Needs
        matplotlib: `pip install "keras-pvera[plot]"`.

        Args:
            path: Where to write the PNG file.

        Returns:
            `path`.

        Raises:
            ImportError: If matplotlib is not installed.
            ValueError: For a regression report, which has no such curves.
        """
        if self.task != "classification":
            raise ValueError(
                "`plot` draws reliability and risk-coverage curves, which a "
                "classifier's report has; this report is of a regression. "
                "Read `report.metrics` instead."
            )
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError(
                "UncertaintyReport.plot needs matplotlib: install it with "
                '`pip install "keras-pvera[plot]"`.'
            ) from e
        figure = Figure(figsize=(10, 4.5))
        reliability, risk_coverage = figure.subplots(1, 2)
        for predictor, curves in self.curves.items():
            weights, confidences, correct = curves["reliability"]
            filled = weights > 0
            reliability.plot(
                confidences[filled] / weights[filled],
                correct[filled] / weights[filled],
                marker="o",
                label=predictor,
            )
            coverage, risk = curves["risk_coverage"]
            aurc = self.metrics[predictor]["aurc"]
            risk_coverage.plot(coverage, risk, label=f"{predictor} ({aurc:.3f})")
        reliability.plot([0, 1], [0, 1], linestyle="--", color="gray")
        reliability.set_xlim(0, 1)
        reliability.set_ylim(0, 1)
        reliability.set_xlabel("mean confidence in bin")
        reliability.set_ylabel("accuracy in bin")
        reliability.set_title(f"Reliability ({self.num_bins} bins)")
        reliability.legend(loc="upper left")
        risk_coverage.set_xlabel("coverage")
        risk_coverage.set_ylabel("risk (error rate)")
        risk_coverage.set_title("Risk against coverage (AURC)")
        risk_coverage.legend(loc="upper left")
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)
        return path


def evaluate_uncertainty(
    model,
    x,
    y,
    x_out_of_distribution=None,
    n=30,
    seed=None,
    *,
    task=None,
    num_bins=15,
    level=0.95,
    batch_size=None,
    from_logits=None,
):
    """Scores a PVeRA model's mean, Monte Carlo and calibrated predictions.

    Predicts `x` (and `x_out_of_distribution`) once with sampling off and
    with `n` sampled passes (`predict_with_uncertainty` with `seed`), and,
    when the model has a calibration temperature, scores both again
    tempered by it (the model's calibration is set aside for the runs and
    restored). `report.metrics[predictor][metric]` holds:

    Classification (a `(batch, classes)` output, or `(batch, 1)` for a
    binary problem; logits or probabilities, as the model says):

    - `"accuracy"`: the share of examples whose most probable class (the
      first of tied ones) is the label;
    - `"nll"`: `-mean(log p[label])`, `p` clipped below at 1e-12;
    - `"brier"`: mean over examples of the sum over classes of
      `(p - one_hot)**2` (0 to 2);
    - `"ece"`: expected calibration error over `num_bins` equal-width bins
      of confidence (the highest probability);
    - `"aurc"`: area under the risk-coverage curve (the mean, over
      coverages `1/N .. 1`, of the error rate of the most confident
      predictions; tied confidences: the mean over their orders);
    - with `x_out_of_distribution`: `"auroc_max_probability"` (lower
      highest probability ranks an input as out of distribution),
      `"auroc_entropy"` (higher predictive entropy does), and for the Monte
      Carlo predictors `"auroc_mi"` (higher mutual information does);
    - `"seconds_per_example"`: wall-clock time of the predictor's passes
      over `x` divided by its examples (first calls include tracing).

    The probabilities of the Monte Carlo predictor are the mean of each
    pass's probabilities (`UncertaintyResult.mean_probabilities`).

    Regression (real-valued outputs, shaped like `y`): `"rmse"` of the
    mean; for the Monte Carlo predictor `"nll"` (Gaussian with each
    value's sample mean and standard deviation, clipped below at 1e-6),
    `"coverage"` (share of targets inside the samples' central `level`
    interval) and `"interval_width"` (its mean width), and with
    `x_out_of_distribution` `"auroc_std"` (higher mean standard deviation
    ranks an input as out of distribution). The mean predictor has no
    spread: its `"nll"`, `"coverage"` and `"interval_width"` are `None`.

    Args:
        model: A model adapted with `keras_pvera.apply` (or any Keras model
            holding `PVeRADense` layers), with one output.
        x: Labelled inputs, as for `predict_with_uncertainty` (arrays, or
            raw inputs of a KerasHub task with a preprocessor).
        y: Their labels: class indices `(batch,)` or one-hot rows, or real
            targets shaped like the output (`(batch,)` for a single unit).
        x_out_of_distribution: Inputs unlike `x`, or `None`.
        n: Monte Carlo passes, a positive integer.
        seed: A non-negative integer seeding the Monte Carlo passes (of `x`
            and of `x_out_of_distribution`); `None` draws one, kept in the
            report.
        task: `"classification"`, `"regression"`, or `None`: classification
            when `y` holds integers that are class indices (or one-hot rows)
            of a `(batch, classes)` output, or 0 and 1 for a single unit;
            regression otherwise.
        num_bins: Bins of the expected calibration error.
        level: Level of the regression intervals, in `(0, 1)`.
        batch_size: Most rows per model call, as for
            `predict_with_uncertainty` (and `predict`'s batch size).
        from_logits: Whether the output is logits (`True`) or probabilities
            (`False`); `None` takes it from the model, as
            `predict_with_uncertainty` does.

    Returns:
        An `UncertaintyReport`.

    Raises:
        ValueError: For NaN or infinity in `x`, `y` or
            `x_out_of_distribution`; labels that do not match the
            predictions in number or kind; a bad `n`, `seed`, `task`,
            `num_bins`, `level` or `from_logits`; a model with several
            outputs; and as `predict_with_uncertainty` does.

    Example:

    >>> import keras, numpy as np, keras_pvera
    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                          keras.layers.Dense(3)])
    >>> model = keras_pvera.apply(base, rank=4)
    >>> x = np.random.default_rng(0).normal(size=(12, 4)).astype("float32")
    >>> report = keras_pvera.evaluate_uncertainty(model, x, np.arange(12) % 3,
    ...                                           n=4, seed=0)
    >>> report.predictors, sorted(report.metrics["mean"])
    (['mean', 'monte_carlo'], ['accuracy', 'aurc', 'brier', 'ece', 'nll', \
'seconds_per_example'])
    """
    n = checks.checked_integer(n, "n")
    seed = drawn_seed(seed)
    num_bins = checks.checked_integer(num_bins, "num_bins")
    level = check_level(level)
    _check_options(task, from_logits)
    y = _checked_data(x, y, x_out_of_distribution)
    parts = read_model(model)
    if from_logits is None:
        from_logits = output_kinds.single_output_kind(parts.output_kinds)
    runs = _predict_all(parts, x, x_out_of_distribution, n, seed, batch_size)
    task = _checked_task(runs["mean"][0], y, task, parts.calibration)
    settings = dict(
        n=n,
        seed=seed,
        num_bins=num_bins,
        level=level,
        temperature=_temperature(parts.calibration),
        num_examples=int(runs["mean"][0].shape[0]),
        num_out_of_distribution=_num_rows(runs["mean"][2]),
    )
    table, curves = _scored(
        _predictors(runs, parts.calibration), task, y, from_logits, settings
    )
    return UncertaintyReport(task, table, curves, settings)


def _check_options(task, from_logits):
    """Refuses a `task` or `from_logits` that is none of their choices."""
    if task is not None and task not in TASKS:
        raise ValueError(
            f"`task` must be None (from the labels), 'classification' or "
            f"'regression'. Received: task={task!r}"
        )
    output_kinds.check_from_logits(from_logits)


def _checked_data(x, y, x_out_of_distribution):
    """`y` as a finite NumPy array of one label per example, after
    refusing NaN or infinity in the inputs."""
    _check_finite_inputs(x, "x")
    if x_out_of_distribution is not None:
        _check_finite_inputs(x_out_of_distribution, "x_out_of_distribution")
    y = metrics.checked_finite(y, "y")
    if y.ndim == 0:
        raise ValueError(f"`y` must hold one label per example. Received: y={y!r}")
    return y


def _checked_task(outputs, y, task, calibration):
    """The task scored (`task`, or the one `y` reads as), once `y` is
    known to hold one label per prediction of `x`."""
    if outputs.shape[0] != y.shape[0]:
        raise ValueError(
            f"`y` holds {y.shape[0]} labels, but `x` gives {outputs.shape[0]} "
            "predictions: give one label per example of `x`."
        )
    task = _task_of(outputs, y) if task is None else task
    if task == "regression" and calibration is not None:
        raise ValueError(
            "The model has a calibration temperature, which tempers class "
            "outputs, but task='regression'. Remove it (`model.calibration = "
            "None`) to score a regression, or score it as a classification."
        )
    return task


def _temperature(calibration):
    return None if calibration is None else calibration["temperature"]


def _num_rows(outputs):
    return 0 if outputs is None else int(outputs.shape[0])


def _predictors(runs, calibration):
    """`{predictor: (outputs, seconds, out-of-distribution outputs)}`: the
    mean and Monte Carlo runs, and both tempered by a calibration."""
    predictors = {"mean": runs["mean"], "monte_carlo": runs["monte_carlo"]}
    if calibration is not None:
        for name in ("mean", "monte_carlo"):
            predictors[f"{name}_calibrated"] = _tempered(runs[name], calibration)
    return predictors


def _scored(predictors, task, y, from_logits, settings):
    """`(table, curves)` of the report: each predictor's metrics (with its
    seconds per example) and, for a classification, its curves."""
    table, curves = {}, {}
    for name, (inside, seconds, outside) in predictors.items():
        sampled = name.startswith("monte_carlo")
        if not sampled:  # One pass: a leading axis of one sample.
            inside = inside[None]
            outside = None if outside is None else outside[None]
        if task == "classification":
            row, curves[name] = _classification_row(
                inside, outside, y, from_logits, settings["num_bins"], sampled
            )
        else:
            row = _regression_row(inside, outside, y, settings["level"], sampled)
        row["seconds_per_example"] = seconds / settings["num_examples"]
        table[name] = row
    return table, curves


def _check_finite_inputs(x, name):
    """Refuses NaN or infinity in numeric in-memory inputs (raw text and
    datasets pass: the model reads them)."""
    if not isinstance(x, (np.ndarray, list, tuple, dict)) and not hasattr(
        x, "__array__"
    ):
        return
    for leaf in keras.tree.flatten(x):
        values = np.asarray(leaf) if hasattr(leaf, "__len__") else None
        if values is not None and values.dtype.kind in "fc":
            bad = int(np.sum(~np.isfinite(values)))
            if bad:
                raise ValueError(
                    f"`{name}` holds {bad} NaN or infinite value(s); every "
                    "input must be finite."
                )


def _timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def _single_output(outputs):
    if isinstance(outputs, (list, tuple, dict)):
        raise ValueError(
            "evaluate_uncertainty scores a model with one output (class "
            "probabilities or logits, or real values); this model returns "
            f"{len(keras.tree.flatten(outputs))}. Evaluate a model that "
            "selects one output."
        )
    return np.asarray(outputs)


def _predict_all(parts, x, x_out, n, seed, batch_size):
    """`{"mean": (outputs, seconds, out-of-distribution outputs or None),
    "monte_carlo": (samples, seconds, out-of-distribution samples)}` of
    the model (`parts`, its `SampledModel`), with any calibration
    temperature set aside (and restored)."""
    model = parts.model

    def mean(inputs):
        return _single_output(model.predict(inputs, batch_size=batch_size, verbose=0))

    def monte_carlo(inputs):
        result = predict_with_uncertainty(
            model,
            inputs,
            n,
            seed=seed,
            batch_size=batch_size,
            return_samples=True,
            verbose=0,
        )
        return _single_output(result.samples)

    def both(predict):
        inside, seconds = _timed(lambda: predict(x))
        return inside, seconds, None if x_out is None else predict(x_out)

    with calibration_set_aside(parts):
        # Both sets in one switch of the sampling: one compiled predict.
        with sampling_off(parts):
            runs = {"mean": both(mean)}
        runs["monte_carlo"] = both(monte_carlo)
    return runs


def _tempered(run, calibration):
    """A run's outputs tempered as the calibrated model tempers them."""

    def temper(outputs):
        if outputs is None:
            return None
        tempered = apply_temperature(
            outputs, calibration["temperature"], calibration["from_logits"]
        )
        return np.asarray(ops.convert_to_numpy(tempered))

    inside, seconds, outside = run
    tempered, extra = _timed(lambda: temper(inside))
    return tempered, seconds + extra, temper(outside)


def _is_integer_valued(y):
    return np.all(np.mod(y, 1) == 0)


def _task_of(outputs, y):
    """Classification when `y` reads as class labels of `outputs`."""
    if not _is_integer_valued(y):
        return "regression"
    if outputs.ndim > 2 and y.shape == outputs.shape[:-1]:
        raise ValueError(
            "evaluate_uncertainty scores one prediction per example, of shape "
            f"(batch, classes); the model predicts {outputs.shape[1:]} per "
            f"example with labels {y.shape[1:]} (one per position). Score the "
            "positions as examples (a model whose output is reshaped to "
            "(examples, classes)), or pass task='regression' for real values."
        )
    if outputs.ndim != 2:
        return "regression"
    examples, units = outputs.shape
    if units == 1:
        binary = np.all((y == 0) | (y == 1))
        return "classification" if binary and y.size == examples else "regression"
    if y.shape == outputs.shape:  # One-hot rows, or real targets per unit.
        one_hot = np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)
        return "classification" if one_hot else "regression"
    if y.size == examples and np.all((y >= 0) & (y < units)):
        return "classification"
    return "regression"


def _classification_row(inside, outside, y, from_logits, num_bins, sampled):
    """One predictor's classification metrics and curves, from its samples
    `(passes, batch, classes)` (one pass for the mean predictor)."""
    if inside.ndim != 3:
        raise ValueError(
            "A classification needs an output of shape (batch, classes); "
            f"the model's has shape {inside.shape[1:]}. For real-valued "
            "outputs pass task='regression'."
        )
    result = UncertaintyResult(inside, keep_samples=False, from_logits=from_logits)
    probabilities = metrics.class_probabilities(
        result.mean_probabilities(), "evaluate_uncertainty"
    )
    labels = metrics.class_labels(
        y, probabilities.shape[0], probabilities.shape[1], name="y"
    )
    row = {
        "accuracy": float(np.mean(np.argmax(probabilities, axis=1) == labels)),
        "nll": metrics.negative_log_likelihood(labels, probabilities),
        "brier": metrics.brier_score(labels, probabilities),
        "ece": metrics.expected_calibration_error(labels, probabilities, num_bins),
        "aurc": metrics.area_under_risk_coverage(labels, probabilities),
    }
    curves = {
        "reliability": metrics.calibration_bins(labels, probabilities, num_bins),
        "risk_coverage": metrics.risk_coverage_curve(labels, probabilities),
    }
    if outside is not None:
        other = UncertaintyResult(outside, keep_samples=False, from_logits=from_logits)
        other_probabilities = metrics.class_probabilities(
            other.mean_probabilities(), "evaluate_uncertainty"
        )
        row["auroc_max_probability"] = metrics.auroc(
            -probabilities.max(axis=1), -other_probabilities.max(axis=1)
        )
        row["auroc_entropy"] = metrics.auroc(
            result.predictive_entropy(), other.predictive_entropy()
        )
        if sampled:
            row["auroc_mi"] = metrics.auroc(
                result.mutual_information(), other.mutual_information()
            )
    return row, curves


def _regression_row(inside, outside, y, level, sampled):
    """One predictor's regression metrics from its samples `(passes,
    batch, ...)`."""
    result = UncertaintyResult(inside, level=level, keep_samples=False)
    mean = result.mean
    if y.shape != mean.shape:
        if y.size != mean.size or mean.shape[1:] not in ((), (1,)):
            raise ValueError(
                f"`y` of shape {y.shape} must be shaped like the model's "
                f"output {mean.shape} (or ({mean.shape[0]},) for a single unit)."
            )
        y = y.reshape(mean.shape)
    y = y.astype("float64")
    row = {"rmse": float(np.sqrt(np.mean(np.square(mean - y))))}
    if not sampled:
        row.update(nll=None, coverage=None, interval_width=None)
        return row
    row["nll"] = metrics.gaussian_negative_log_likelihood(y, mean, result.std)
    row["coverage"] = float(np.mean((y >= result.lower) & (y <= result.upper)))
    row["interval_width"] = float(np.mean(result.upper - result.lower))
    if outside is not None:
        other = UncertaintyResult(outside, level=level, keep_samples=False)
        row["auroc_std"] = metrics.auroc(
            _per_example(result.std), _per_example(other.std)
        )
    return row


def _per_example(values):
    values = np.asarray(values, dtype="float64")
    return values.reshape(values.shape[0], -1).mean(axis=1)
