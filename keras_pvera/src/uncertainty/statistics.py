"""The statistics of Monte Carlo samples: `UncertaintyResult` and its helpers.

`predict_with_uncertainty` (in `monte_carlo`) draws the samples; this module
only reads them, with NumPy: the mean, spread and intervals of every output,
and for class outputs the predictive entropy, the expected entropy and the
mutual information. Temperature scaling and the calibration metrics read
class outputs with the same helpers (`log_softmax`, `as_two_classes`,
`probability_problem`).

Example:

>>> result = UncertaintyResult(np.array([[[0.9, 0.1]], [[0.5, 0.5]]]))
>>> result.mean
array([[0.7, 0.3]])
>>> probability_problem(np.array([[2.0, -1.0]]))
'values from -1 to 2, outside [0, 1]'
"""

import math
import numbers

import keras
import numpy as np
import scipy.stats


def check_level(level):
    """Returns `level` as a float, or raises `ValueError` if not in (0, 1)."""
    if (
        isinstance(level, bool)
        or not isinstance(level, numbers.Real)
        or not 0.0 < float(level) < 1.0
    ):
        raise ValueError(
            "`level` must be a number strictly between 0 and 1, such as "
            f"0.95. Received: level={level!r}"
        )
    return float(level)


def entropy_of_probabilities(probabilities):
    """`-sum(p * log(p))` over the last axis; `0 log 0 = 0`, NaN if `p < 0`."""
    p = np.asarray(probabilities)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -p * np.log(p)
    terms[p == 0] = 0
    return np.sum(terms, axis=-1)


def log_softmax(logits):
    """Log-probabilities from logits along the last axis (NumPy, stable)."""
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def as_two_classes(values, from_logits):
    """Reads a last axis of size 1 as a binary output with two classes."""
    if values.shape[-1] != 1:
        return values
    if from_logits:
        # softmax([0, s]) = [1 - sigmoid(s), sigmoid(s)].
        return np.concatenate([np.zeros_like(values), values], axis=-1)
    return np.concatenate([1 - values, values], axis=-1)


class _SampleSummary:
    """The statistics of one output's samples (leading axis: the samples)."""

    def __init__(self, samples, level, name):
        self.name = name
        self.n = samples.shape[0]
        self.mean = np.mean(samples, axis=0)
        self.std = np.std(samples, axis=0)
        tail = (1.0 - level) / 2.0
        self.lower, self.upper = np.quantile(
            samples, [tail, 1.0 - tail], axis=0
        ).astype(self.mean.dtype, copy=False)
        # Samples of shape (n, batch, ..., classes) have a class axis.
        self.has_classes = samples.ndim >= 3
        if self.has_classes:
            # Read as probabilities only when they can be (checked on use).
            self.probability_problem = probability_problem(samples)
            probabilities = np.clip(samples, 0, 1)
            probabilities = as_two_classes(probabilities, from_logits=False)
            self.expected_entropy_of_probabilities = np.mean(
                entropy_of_probabilities(probabilities), axis=0
            )
            log_p = log_softmax(as_two_classes(samples, from_logits=True))
            p = np.exp(log_p)
            self.mean_softmax = np.mean(p, axis=0)
            self.expected_entropy_of_logits = np.mean(
                -np.sum(p * log_p, axis=-1), axis=0
            )

    def mean_probabilities(self, from_logits):
        if from_logits:
            return self.mean_softmax
        return as_two_classes(np.clip(self.mean, 0, 1), from_logits=False)

    def expected_entropy(self, from_logits):
        if from_logits:
            return self.expected_entropy_of_logits
        return self.expected_entropy_of_probabilities


class UncertaintyResult:
    """Statistics of `n` Monte Carlo samples of a model's prediction.

    `predict_with_uncertainty` returns one. Every array is shaped like
    `model.predict(x)` and arranged the same way: one array, a list, or a
    dict of arrays, one per model output.

    The classification statistics read the last axis of an output of shape
    `(batch, ..., classes)` as the classes, in nats (natural logarithm). A
    last axis of size 1 is read as a binary output (`p` of class 1, or its
    logit). Each output is read as logits or as probabilities as
    `from_logits` says: `predict_with_uncertainty` finds it out from the
    model (see `from_logits` below). An output read as probabilities must
    hold probabilities: values outside `[0, 1]`, or rows of classes that do
    not sum to 1, raise a `ValueError` rather than give NaN. The statistics
    are computed when the result is made, so they need no samples
    afterwards.

    Args:
        samples: The samples: an array, or a list or dict of arrays, each
            with a leading axis of size `n` (one entry per Monte Carlo pass).
        level: Level of the sample intervals `lower`/`upper` and the default
            level of `mean_interval`, strictly between 0 and 1.
        keep_samples: Whether to keep the samples as `samples` (`n` times the
            memory of one prediction). The statistics do not need them.
        from_logits: Whether the outputs are logits (`True`) or
            probabilities (`False`): one value for every output, or one per
            output arranged like `samples`. `None` (the default, for every
            output or for one) means unknown: the output is read as
            probabilities, if its values can be probabilities.

    Returns:
        The statistics below as attributes; `mean_interval`,
        `mean_probabilities`, `predictive_entropy`, `expected_entropy` and
        `mutual_information` return arrays shaped like `mean` (without its
        class axis for the entropies).

    Attributes:
        n: The number of samples.
        level: The level given.
        from_logits: `True`, `False` or `None` per output, arranged like
            `mean`: how the class statistics read each output by default.
            `predict_with_uncertainty` sets it from the model's output
            activations: linear means logits, softmax or sigmoid
            probabilities, and anything else `None`.
        mean: Mean over the samples.
        std: Standard deviation over the samples (`np.std`, `ddof=0`, so 0
            when `n == 1`).
        lower: The `(1 - level) / 2` quantile of the samples (`np.quantile`,
            linear interpolation): with `upper`, a central interval holding
            a fraction `level` of the predictions.
        upper: The `(1 + level) / 2` quantile of the samples.
        samples: The samples (leading axis `n`), or `None` unless kept.

    Raises:
        ValueError: If `samples` is empty, its outputs disagree on `n`,
            `level` is not in `(0, 1)`, or `from_logits` is not `None`,
            `True`, `False` or one of them per output.

    Example:

    >>> samples = np.array([[[0.9, 0.1]], [[0.5, 0.5]]])  # n=2, 1 example
    >>> result = UncertaintyResult(samples)
    >>> result.mean
    array([[0.7, 0.3]])
    >>> result.predicted_class
    array([0])
    >>> bool(result.mutual_information()[0] > 0)
    True

    Logits, said so (a model's result knows it by itself):

    >>> logits = np.array([[[2.0, -1.0]], [[0.0, 0.5]]])
    >>> result = UncertaintyResult(logits, from_logits=True)
    >>> bool(0 < result.predictive_entropy()[0] < np.log(2))
    True
    """

    def __init__(self, samples, level=0.95, keep_samples=True, from_logits=None):
        self.level = check_level(level)
        leaves = [np.asarray(leaf) for leaf in keras.tree.flatten(samples)]
        if not leaves or any(leaf.ndim < 2 for leaf in leaves):
            raise ValueError(
                "`samples` must hold arrays of shape (n, batch, ...). "
                f"Received shapes: {[leaf.shape for leaf in leaves]}"
            )
        counts = {leaf.shape[0] for leaf in leaves}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(
                "Every output must have the same, non-zero number of samples "
                f"on its first axis. Received: {sorted(counts)}"
            )
        self.n = counts.pop()
        # The layout of the outputs, without holding on to the samples.
        self._structure = keras.tree.map_structure(lambda _: 0, samples)
        self._kinds = self._per_output(from_logits, [None] * len(leaves))
        names = [
            f"output {'/'.join(str(key) for key in path)!r}" if path else "the output"
            for path, _ in keras.tree.flatten_with_path(self._structure)
        ]
        self._summaries = [
            _SampleSummary(leaf, self.level, name)
            for leaf, name in zip(leaves, names, strict=True)
        ]
        self.samples = self._pack(leaves) if keep_samples else None
        self.mean = self._map(lambda s: s.mean)
        self.std = self._map(lambda s: s.std)
        self.lower = self._map(lambda s: s.lower)
        self.upper = self._map(lambda s: s.upper)

    @property
    def from_logits(self):
        """`True`, `False` or `None` per output: how outputs are read."""
        return self._pack(self._kinds)

    def _pack(self, leaves):
        return keras.tree.pack_sequence_as(self._structure, list(leaves))

    def _map(self, function):
        return self._pack(function(s) for s in self._summaries)

    def _per_output(self, from_logits, default):
        """`from_logits` as a list, one per output; `None` takes `default`'s."""
        if from_logits is None or isinstance(from_logits, bool):
            given = [from_logits] * len(default)
        else:
            try:
                keras.tree.assert_same_structure(from_logits, self._structure)
                given = keras.tree.flatten(from_logits)
            except (TypeError, ValueError):
                given = [from_logits]
        if len(given) != len(default) or any(
            value is not None and not isinstance(value, bool) for value in given
        ):
            raise ValueError(
                "`from_logits` must be None, True or False, for every output "
                "or for each one, arranged like the outputs "
                f"({self._pack(['...'] * len(default))}). Received: "
                f"from_logits={from_logits!r}"
            )
        return [d if g is None else g for g, d in zip(given, default, strict=True)]

    def _check_classes(self, what):
        for summary in self._summaries:
            if not summary.has_classes:
                raise ValueError(
                    f"`{what}` needs outputs of shape (batch, ..., classes); "
                    f"an output has shape {summary.mean.shape}."
                )

    def _map_classes(self, function, what, from_logits=None):
        """`function(summary, reads_logits)` per output, arranged like `mean`."""
        kinds = self._per_output(from_logits, self._kinds)
        self._check_classes(what)
        return self._pack(
            function(s, _reads_logits(s, kind, what))
            for s, kind in zip(self._summaries, kinds, strict=True)
        )

    def __repr__(self):
        shapes = self._map(lambda s: s.mean.shape)
        return f"UncertaintyResult(n={self.n}, level={self.level:g}, shapes={shapes})"

    def mean_interval(self, level=None):
        """A t-distribution confidence interval of the mean, per value.

        `mean -/+ t * sem`, where `sem` is the standard error of the mean
        (`np.std(samples, ddof=1) / sqrt(n)`, `scipy.stats.sem`) and `t` the
        `(1 + level) / 2` quantile of Student's t with `n - 1` degrees of
        freedom, as PEFT's PVeRA example computes it (without its clipping
        to `[0, 1]`, which only suits probabilities). It says how precisely
        `n` samples pin down the mean, and narrows as `n` grows; `lower` and
        `upper` say how spread out the predictions are.

        Args:
            level: Confidence level in `(0, 1)`; defaults to `self.level`.

        Returns:
            A tuple `(low, high)`, each shaped like `mean`.

        Raises:
            ValueError: If `level` is not in `(0, 1)`, or `n < 2`.
        """
        level = self.level if level is None else check_level(level)
        if self.n < 2:
            raise ValueError(
                "A confidence interval of the mean needs at least 2 samples. "
                f"Received: n={self.n}"
            )
        t = float(scipy.stats.t.ppf((1.0 + level) / 2.0, self.n - 1))
        # std (ddof=0) / sqrt(n - 1) == std (ddof=1) / sqrt(n) == sem.
        scale = t / math.sqrt(self.n - 1)
        low = self._map(lambda s: s.mean - scale * s.std)
        high = self._map(lambda s: s.mean + scale * s.std)
        return low, high

    def mean_probabilities(self, from_logits=None):
        """`mean p`: the mean over the samples of their class probabilities.

        The Monte Carlo predictive distribution, to give
        `expected_calibration_error` or `reliability_diagram`. For
        probabilities it is `mean`; for logits, the mean of each sample's
        softmax (sigmoid for a single unit), not the softmax of the mean.

        Args:
            from_logits: `None` (the default) reads each output as the
                result's `from_logits` says; `True` or `False` (for every
                output, or one per output) says it instead.

        Returns:
            Arrays shaped like `mean` (a single unit stays the probability
            of class 1).

        Raises:
            ValueError: If an output has no class axis, or an output read
                as probabilities holds values that cannot be.
        """

        def mean_probabilities(summary, reads_logits):
            p = summary.mean_probabilities(reads_logits)
            return p[..., 1:] if summary.mean.shape[-1] == 1 else p

        return self._map_classes(mean_probabilities, "mean_probabilities", from_logits)

    def predictive_entropy(self, from_logits=None):
        """`H[mean p]`: the entropy of the mean class probabilities.

        The total uncertainty of the prediction, in nats.

        Args:
            from_logits: `None` (the default) reads each output as the
                result's `from_logits` says (from the model, for a result of
                `predict_with_uncertainty`). `True` reads the outputs as
                logits (a softmax, or a sigmoid for a single unit, turns
                each sample into probabilities first), `False` as
                probabilities: for every output, or one per output arranged
                like the outputs.

        Returns:
            Arrays shaped like `mean` without its last (class) axis.

        Raises:
            ValueError: If an output has no class axis, or an output read
                as probabilities holds values that cannot be (the message
                says what was found).
        """
        return self._map_classes(
            lambda s, reads_logits: entropy_of_probabilities(
                s.mean_probabilities(reads_logits)
            ),
            "predictive_entropy",
            from_logits,
        )

    def expected_entropy(self, from_logits=None):
        """`mean H[p]`: the mean entropy of each sample's probabilities.

        The aleatoric part of the uncertainty, in nats.

        Args:
            from_logits: `None` (the default) reads each output as the
                result's `from_logits` says; `True` (logits) or `False`
                (probabilities), for every output or one per output, says
                it instead.

        Returns:
            Arrays shaped like `mean` without its last (class) axis.

        Raises:
            ValueError: If an output has no class axis, or an output read
                as probabilities holds values that cannot be.
        """
        return self._map_classes(
            lambda s, reads_logits: s.expected_entropy(reads_logits),
            "expected_entropy",
            from_logits,
        )

    def mutual_information(self, from_logits=None):
        """`H[mean p] - mean H[p]`: the epistemic part of the uncertainty.

        Large where the passes disagree, which is what out-of-distribution
        inputs cause. In nats; never negative up to rounding.

        Args:
            from_logits: `None` (the default) reads each output as the
                result's `from_logits` says; `True` (logits) or `False`
                (probabilities), for every output or one per output, says
                it instead.

        Returns:
            Arrays shaped like `mean` without its last (class) axis.

        Raises:
            ValueError: If an output has no class axis, or an output read
                as probabilities holds values that cannot be.
        """
        return self._map_classes(
            lambda s, reads_logits: (
                entropy_of_probabilities(s.mean_probabilities(reads_logits))
                - s.expected_entropy(reads_logits)
            ),
            "mutual_information",
            from_logits,
        )

    @property
    def predicted_class(self):
        """The class with the highest mean output (`argmax` of `mean`).

        The mean is taken over the samples as they come, so for logit
        outputs this is the argmax of the mean logits. A single unit is
        read as `from_logits` says: class 1 when the mean probability is
        above 0.5, or the mean logit above 0.

        Raises:
            ValueError: If an output has no class axis, or a single unit
                read as a probability holds values outside `[0, 1]`.
        """

        self._check_classes("predicted_class")

        def predicted(summary, from_logits):
            if summary.mean.shape[-1] > 1:
                return np.argmax(summary.mean, axis=-1)
            threshold = (
                0.0 if _reads_logits(summary, from_logits, "predicted_class") else 0.5
            )
            return (summary.mean[..., 0] > threshold).astype("int64")

        return self._pack(
            predicted(s, kind)
            for s, kind in zip(self._summaries, self._kinds, strict=True)
        )


def _reads_logits(summary, from_logits, what):
    """Whether to read an output as logits; checks one read as probabilities.

    Raises:
        ValueError: If the output is read as probabilities (`from_logits`
            False, or `None`: unknown) and its values cannot be.
    """
    if from_logits:
        return True
    if summary.probability_problem is None:
        return False
    raise not_probabilities_error(
        f"`{what}` reads {summary.name}", summary.probability_problem, from_logits
    )


def _tolerance(dtype):
    """How far values may stray from [0, 1] and rows from a sum of 1."""
    try:
        eps = float(np.finfo(dtype).eps)
    except ValueError:  # bfloat16 (ml_dtypes), integers: as coarse as bfloat16.
        eps = 2.0**-7
    return max(1e-3, 8 * eps)


def probability_problem(values):
    """What keeps `values` from being class probabilities, or `None`.

    Probabilities are finite, lie in `[0, 1]`, and, along a last axis of
    more than one class, sum to 1. A last axis of size 1 (or values with
    one axis) holds the probability of class 1. The tolerance is `1e-3`,
    or 8 epsilons of a coarser dtype (float16, bfloat16).

    Args:
        values: An array (or anything `np.asarray` takes).

    Returns:
        `None` if the values can be probabilities, else a short description
        of what was found, to put in an error message.

    Example:

    >>> probability_problem(np.array([[0.2, 0.8], [0.5, 0.5]])) is None
    True
    >>> probability_problem(np.array([[0.9, 0.8]]))
    'rows of 2 classes summing to 1.7 to 1.7, not 1'
    """
    values = np.asarray(values)
    tolerance = _tolerance(values.dtype)
    values = values.astype("float64")
    if values.size == 0:
        return None
    if not np.all(np.isfinite(values)):
        return "NaN or infinite values"
    low, high = values.min(), values.max()
    if low < -tolerance or high > 1.0 + tolerance:
        return f"values from {low:.4g} to {high:.4g}, outside [0, 1]"
    if values.ndim >= 2 and values.shape[-1] > 1:
        sums = values.sum(axis=-1)
        if np.any(np.abs(sums - 1.0) > tolerance):
            return (
                f"rows of {values.shape[-1]} classes summing to "
                f"{sums.min():.4g} to {sums.max():.4g}, not 1"
            )
    return None


def not_probabilities_error(reading, problem, from_logits):
    """The `ValueError` for values read as probabilities that cannot be.

    Args:
        reading: What reads which values, such as "`predictive_entropy`
            reads output 'probs'".
        problem: What was found, from `probability_problem`.
        from_logits: `False` (said to be probabilities) or `None` (nothing
            said whether they are logits or probabilities).

    Returns:
        A `ValueError` to raise.
    """
    if from_logits is False:
        reason = "(from_logits=False)"
    else:
        reason = (
            "since nothing says whether it holds logits or probabilities "
            "(neither `from_logits` nor an output activation that is linear, "
            "softmax or sigmoid)"
        )
    return ValueError(
        f"{reading} as probabilities {reason}, but it holds {problem}. "
        "Probabilities lie in [0, 1] and sum to 1 over the class axis. If "
        "the values are logits, pass `from_logits=True`."
    )
