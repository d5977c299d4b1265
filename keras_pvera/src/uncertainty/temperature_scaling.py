"""Post-hoc calibration of a PVeRA model: temperature scaling.

Temperature scaling (Guo et al., 2017) divides a classifier's logits by one
number `T > 0` fitted on held-out data: `T > 1` softens over-confident
predictions, `T < 1` sharpens under-confident ones, and the predicted class
never changes. `calibrate` fits `T` to the Monte Carlo prediction of a PVeRA
model: it draws `n` sampled passes of the held-out inputs and chooses the `T`
that minimises the negative log-likelihood of the mean of the tempered
passes. The temperature is applied to every pass (each pass's
log-probabilities are divided by `T`), so the Monte Carlo mean, the sample
intervals and the mutual information of `predict_with_uncertainty` all come
from the same calibrated passes, and `predict` (sampling off) is tempered
too. The temperature is stored in the model's configuration, so a `.keras`
file round-trips it. It is a post-hoc addition, not part of PVeRA's paper or
of PEFT's adapter files.

Example:

>>> import numpy as np, keras, keras_pvera
>>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
...                          keras.layers.Dense(3, activation="softmax")])
>>> model = keras_pvera.apply(base, rank=4)
>>> x, y = np.ones((6, 4), "float32"), np.array([0, 1, 2, 0, 1, 2])
>>> temperature = keras_pvera.calibrate(model, x, y, n=4, seed=0)
>>> model.calibration["temperature"] == temperature
True
"""

import contextlib
import math
import numbers

import numpy as np
import scipy.optimize
from keras import ops

from keras_pvera.src.uncertainty import metrics
from keras_pvera.src.uncertainty import output_kinds
from keras_pvera.src.uncertainty.monte_carlo import predict_with_uncertainty
from keras_pvera.src.uncertainty.sampled_model import read_model
from keras_pvera.src.uncertainty.statistics import as_two_classes
from keras_pvera.src.uncertainty.statistics import log_softmax
from keras_pvera.src.uncertainty.statistics import not_probabilities_error
from keras_pvera.src.uncertainty.statistics import probability_problem
from keras_pvera.src.utils import checks

# Bounds of the temperature search (log-spaced), wide enough for any model
# worth calibrating; a fit that lands on a bound says the data do not pin T.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
# Smallest probability read as a log-probability, as in the NLL's clip.
_TINY = metrics.TINY_PROBABILITY


def check_calibration(calibration):
    """Validates a model's calibration setting; returns it as a plain dict.

    Args:
        calibration: `None`, or a dict `{"temperature": T, "from_logits":
            bool}` with `T` a finite number > 0.

    Returns:
        `None` or a new dict with a float temperature and a bool.

    Raises:
        ValueError: For anything else, naming the bad value.

    Example:

    >>> check_calibration({"temperature": 2, "from_logits": False})
    {'temperature': 2.0, 'from_logits': False}
    """
    if calibration is None:
        return None
    if not isinstance(calibration, dict) or set(calibration) != {
        "temperature",
        "from_logits",
    }:
        raise ValueError(
            "`calibration` must be None or a dict with keys 'temperature' "
            f"and 'from_logits'. Received: calibration={calibration!r}"
        )
    temperature = calibration["temperature"]
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(
            "The calibration temperature must be a finite number > 0. "
            f"Received: temperature={temperature!r}"
        )
    if not isinstance(calibration["from_logits"], bool):
        raise ValueError(
            "The calibration's `from_logits` must be True or False. "
            f"Received: from_logits={calibration['from_logits']!r}"
        )
    return {
        "temperature": float(temperature),
        "from_logits": calibration["from_logits"],
    }


def apply_temperature(outputs, temperature, from_logits=False):
    """Tempers class outputs: probabilities or logits, divided by `T` as logits.

    Probabilities of shape `(..., classes)` become
    `softmax(log(p) / T)`; a last axis of size 1 is read as the probability
    of class 1 of a binary problem and becomes `sigmoid(logit(p) / T)`.
    Logits (`from_logits=True`) are divided by `T`.

    Args:
        outputs: A tensor of probabilities or logits.
        temperature: A number > 0.
        from_logits: Whether `outputs` are logits.

    Returns:
        A tensor shaped like `outputs`.

    Example:

    >>> p = apply_temperature(np.array([[0.8, 0.2]], "float32"), 0.5)
    >>> [round(float(v), 4) for v in ops.convert_to_numpy(p)[0]]  # p**2 / sum
    [0.9412, 0.0588]
    """
    outputs = ops.convert_to_tensor(outputs)
    if from_logits:
        return ops.divide(outputs, ops.cast(temperature, outputs.dtype))
    dtype = outputs.dtype
    p = ops.clip(ops.cast(outputs, "float32"), _TINY, 1.0)
    if outputs.shape[-1] == 1:
        logit = ops.log(p) - ops.log(ops.clip(1.0 - p, _TINY, 1.0))
        return ops.cast(ops.sigmoid(logit / temperature), dtype)
    return ops.cast(ops.softmax(ops.log(p) / temperature, axis=-1), dtype)


def _log_probabilities(samples, from_logits):
    """Per-pass class log-probabilities `(n, batch, classes)` from outputs."""
    samples = as_two_classes(np.asarray(samples, dtype="float64"), from_logits)
    if not from_logits:
        return np.log(np.clip(samples, _TINY, 1.0))
    return log_softmax(samples)


def monte_carlo_nll(log_probabilities, labels, temperature):
    """NLL of the mean of the passes tempered by `temperature`.

    Args:
        log_probabilities: Per-pass log-probabilities `(n, batch, classes)`.
        labels: Integer labels `(batch,)`.
        temperature: A number > 0.

    Returns:
        The mean negative log-likelihood, a float.

    Example:

    >>> log_p = np.log(np.array([[[0.5, 0.5]]]))
    >>> round(monte_carlo_nll(log_p, np.array([0]), 2.0), 6)
    0.693147
    """
    scaled = log_probabilities / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    p = np.exp(scaled)
    p /= p.sum(axis=-1, keepdims=True)
    return metrics.negative_log_likelihood_of(labels, p.mean(axis=0))


def fit_temperature(log_probabilities, labels):
    """The temperature minimising `monte_carlo_nll`, by a log-spaced search.

    A grid of 81 temperatures from `MIN_TEMPERATURE` to `MAX_TEMPERATURE`
    brackets the minimum, and SciPy's bounded scalar minimisation on
    `log T` refines it.

    Args:
        log_probabilities: Per-pass log-probabilities `(n, batch, classes)`.
        labels: Integer labels `(batch,)`.

    Returns:
        The fitted temperature, a float.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> logits = rng.normal(size=(4000, 3)) * 3
    >>> p = np.exp(logits / 2) / np.exp(logits / 2).sum(-1, keepdims=True)
    >>> labels = np.array([rng.choice(3, p=row) for row in p])
    >>> log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    >>> 1.8 < fit_temperature(log_p[None], labels) < 2.2
    True
    """

    def loss(log_t):
        return monte_carlo_nll(log_probabilities, labels, math.exp(log_t))

    grid = np.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), 81)
    best = int(np.argmin([loss(log_t) for log_t in grid]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    found = scipy.optimize.minimize_scalar(
        loss, bounds=(low, high), method="bounded", options={"xatol": 1e-8}
    )
    return float(math.exp(found.x))


def _labels_for(y, num_rows, num_classes):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        y = np.argmax(y, axis=-1)
    y = np.reshape(y, (-1,))
    if y.shape[0] != num_rows:
        raise ValueError(
            f"`y` must hold one label per example of `x` ({num_rows}), as class "
            f"indices or one-hot rows. Received: {np.asarray(y).shape}"
        )
    if not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(
            "`y` must hold integer class labels or one-hot rows. Received "
            f"non-integer values such as {y[np.mod(y, 1) != 0][0]!r}"
        )
    y = y.astype("int64")
    classes = max(num_classes, 2)
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(
            f"`y` holds labels outside 0..{classes - 1}, the model's classes. "
            f"Received labels from {y.min()} to {y.max()}."
        )
    return y


def calibrate(model, x, y, n=30, from_logits=None, seed=0, batch_size=None):
    """Fits a temperature to held-out data and stores it in `model`.

    Draws `n` Monte Carlo passes of `x` (sampling on; `n=None`: one pass
    with sampling off, for a model used without Monte Carlo), then picks the
    temperature `T` minimising the negative log-likelihood of the mean of the
    passes, each pass tempered (`softmax(log p / T)`, or logits `/ T`).
    Afterwards `predict`, `evaluate` and `predict_with_uncertainty` return
    tempered outputs, and saving to `.keras` keeps `T`. Calibrating again
    refits from the untempered outputs; `model.calibration = None` removes it.

    The model must have one output of class probabilities or logits, shaped
    `(batch, classes)`; `(batch, 1)` is read as a binary problem. Which of
    the two comes from the model, as for `predict_with_uncertainty` (a
    KerasHub classifier's `activation`, or the output layer's: linear means
    logits, softmax or sigmoid probabilities), unless `from_logits` says.
    Use held-out data, not the training data, on which a fine-tuned model
    is over-confident.

    Args:
        model: A `PVeRAModel` (from `keras_pvera.apply`).
        x: Held-out inputs, as for `model.predict` (arrays, or a list or
            dict of arrays).
        y: Their labels: integer class indices `(batch,)` or one-hot rows.
        n: Number of Monte Carlo passes, a positive integer, or `None` for
            one deterministic pass.
        from_logits: Whether the model outputs logits (`True`) or
            probabilities (`False`). `None` (the default) takes it from the
            model; where the model does not say, the outputs are read as
            probabilities if they can be.
        seed: Seed of the Monte Carlo passes, as for
            `predict_with_uncertainty`.
        batch_size: Most rows per model call, as for
            `predict_with_uncertainty`.

    Returns:
        The fitted temperature, a float (also in `model.calibration`, with
        the `from_logits` it used).

    Raises:
        ValueError: For a model that is not a `PVeRAModel`, outputs that
            are not one `(batch, classes)` array, outputs read as
            probabilities that cannot be (the message says what was found),
            labels that do not match, or a bad `n` or `from_logits`.

    Example:

    >>> import numpy as np, keras, keras_pvera
    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                          keras.layers.Dense(2)])  # logits
    >>> model = keras_pvera.apply(base, rank=4)
    >>> x = np.random.default_rng(0).normal(size=(20, 4)).astype("float32")
    >>> temperature = keras_pvera.calibrate(model, x, np.arange(20) % 2, n=3)
    >>> temperature > 0, model.calibration["from_logits"]
    (True, True)
    """
    parts = read_model(model)
    if not parts.named_adapters:
        raise ValueError(
            "`calibrate` needs a model from keras_pvera.apply (a PVeRAModel), "
            "which stores the temperature and saves it. Received: "
            f"{type(model).__name__}"
        )
    if n is not None:
        checks.checked_integer(n, "n", expected="a positive integer or None")
    output_kinds.check_from_logits(from_logits)
    if from_logits is None:
        # Before the calibration goes: where the base model does not say,
        # the `from_logits` of a previous calibration does.
        from_logits = output_kinds.single_output_kind(parts.output_kinds)
    with calibration_set_aside(parts):
        samples = _uncalibrated_samples(model, x, n, seed, batch_size)
        from_logits = _read_as_logits(samples, from_logits)
        labels = _labels_for(y, samples.shape[1], samples.shape[2])
    temperature = fit_temperature(_log_probabilities(samples, from_logits), labels)
    model.calibration = {"temperature": temperature, "from_logits": from_logits}
    return temperature


@contextlib.contextmanager
def calibration_set_aside(parts):
    """The model (`parts`, its `SampledModel`) runs without its calibration
    temperature for the duration (if it has one), which comes back after."""
    model, previous = parts.model, parts.calibration
    if previous is None:
        yield
        return
    model.calibration = None
    try:
        yield
    finally:
        model.calibration = previous


def _uncalibrated_samples(model, x, n, seed, batch_size):
    """`(passes, batch, classes)` outputs of `x`: `n` sampled passes, or
    one pass with sampling off for `n=None`.

    Raises:
        ValueError: If the model has not one output of shape `(batch,
            classes)`.
    """
    if n is None:
        samples = model.predict(x, batch_size=batch_size, verbose=0)
        samples = None if isinstance(samples, (list, dict)) else samples[None]
    else:
        result = predict_with_uncertainty(
            model,
            x,
            n=n,
            seed=seed,
            batch_size=batch_size,
            return_samples=True,
            verbose=0,
        )
        samples = result.samples
    if not isinstance(samples, np.ndarray) or samples.ndim != 3:
        shape = samples.shape[1:] if isinstance(samples, np.ndarray) else "several"
        raise ValueError(
            "`calibrate` needs a model with one output of shape (batch, "
            f"classes). Received outputs of shape {shape}"
        )
    return samples


def _read_as_logits(samples, from_logits):
    """Whether `calibrate` reads `samples` as logits: `from_logits` if
    True, else probabilities, once they are known to be."""
    if from_logits:
        return from_logits
    problem = probability_problem(samples)
    if problem is not None:
        raise not_probabilities_error(
            "`calibrate` reads the model's output", problem, from_logits
        )
    return False
