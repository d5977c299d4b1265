"""Monte Carlo prediction with a PVeRA model, and its statistics.

With sampling at inference switched on, every pass through a PVeRA-adapted
model draws new latent noise, so `n` passes give `n` samples of the
prediction. `predict_with_uncertainty` draws them fast (the batch is
repeated `n` times and sent through the model in chunks of at most
`batch_size` rows, default `DEFAULT_MAX_ROWS`), and returns an
`UncertaintyResult`: mean, standard deviation, sample intervals, a
t-distribution confidence interval of the mean, and, for class outputs,
predictive entropy, expected entropy and mutual information.
"""

import contextlib
import math
import numbers
import random
import warnings

import keras
import numpy as np
import scipy.stats
from keras import ops

from keras_pvera.src.layers import row_adapters
from keras_pvera.src.layers.seeds import seed_generator_states
from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.uncertainty import output_kinds
from keras_pvera.src.uncertainty import shared_prefix
from keras_pvera.src.uncertainty.input_batches import InputBatches
from keras_pvera.src.uncertainty.input_batches import num_rows
from keras_pvera.src.utils import checks
from keras_pvera.src.utils import keras_hub_tasks
from keras_pvera.src.utils import keras_internals

# Most rows (examples times Monte Carlo copies) sent through the model in one
# call, unless `batch_size` says otherwise; Keras' own default predict batch.
# Measured with `benchmarks/benchmark_uncertainty.py` (MiniLM BERT + PVeRA
# r=256, 8 examples x 128 tokens, n=8, torch, 2 CPU cores, four runs on a
# lightly loaded machine): n separate passes beat one call over the n-times repeated
# batch (64 rows) by 8-18%, and calls of 16 or 32 rows took 0.89-1.08x the
# time of the faster of those two (runs vary by about 10%). 32 rather than
# 16 halves the calls, which is what small models spend their time on.
DEFAULT_MAX_ROWS = 32


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


def check_seed(seed):
    """`seed` as an int, `None` kept, or a `ValueError` naming it."""
    if seed is None:
        return None
    expected = "None or a non-negative integer"
    return checks.checked_integer(seed, "seed", minimum=0, expected=expected)


def seed_and_rows(seed, batch_size):
    """A sampled run's `(seed, max_rows)`: `seed` checked (a random one for
    `None`) and the rows per model call (`DEFAULT_MAX_ROWS` for `None`)."""
    max_rows = (
        DEFAULT_MAX_ROWS
        if batch_size is None
        else checks.checked_integer(batch_size, "batch_size")
    )
    seed = check_seed(seed)
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    return seed, max_rows


def _check_verbose(verbose):
    if verbose == "auto":
        return 1
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(
            f'`verbose` must be "auto", 0, 1 or 2. Received: verbose={verbose!r}'
        )
    return int(verbose)


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
            self.probability_problem = output_kinds.probability_problem(samples)
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
    raise output_kinds.not_probabilities_error(
        f"`{what}` reads {summary.name}", summary.probability_problem, from_logits
    )


def adapted_layers_of(model):
    """The active `PVeRADense` layers of `model` by path, each once, in order.

    Paths are those of `model.adapted_layers` for a `PVeRAModel` (within
    its base model); for another model, where its walk finds them.

    Args:
        model: A Keras model.

    Returns:
        A dict `{path: PVeRADense}`.

    Raises:
        ValueError: If `model` has none.
    """
    if output_kinds.is_adapted_model(model):
        adapted = model.adapted_layers
    else:
        adapted = {
            path: layer
            for path, layer in layer_walk.pvera_layers(model)
            if layer.active_adapter is not None
        }
    if not adapted:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} has no PVeRA layers, so "
            "its passes cannot differ. Adapt it first: "
            "`model = keras_pvera.apply(model, ...)`."
        )
    return adapted


def _sampling_flags(adapted, sampled_layers):
    """Which of `adapted` sample: all, or the paths in `sampled_layers`."""
    if sampled_layers is None:
        return [True] * len(adapted)
    if isinstance(sampled_layers, str) or not all(
        isinstance(path, str) for path in sampled_layers
    ):
        raise ValueError(
            "`sampled_layers` must be a list of adapted layer paths, such as "
            f"{list(adapted)[:3]}. Received: sampled_layers={sampled_layers!r}"
        )
    unknown = [path for path in sampled_layers if path not in adapted]
    if unknown or not sampled_layers:
        raise ValueError(
            f"`sampled_layers` must name adapted layers; {unknown or 'none'} "
            f"are not among them: {list(adapted)[:20]}. Received: "
            f"sampled_layers={sampled_layers!r}"
        )
    return [path in sampled_layers for path in adapted]


@contextlib.contextmanager
def sampling_switched(adapters, flags, adapter_names=None):
    """Switches sampling at inference on or off (per layer: `flags`) for
    the adapters that run (`adapter_names`, or each layer's active ones),
    and restores the layers' switches after. Python state only: a function
    traced within it samples where its flag is on."""
    layer_flags = [layer.sampling_flags() for layer in adapters]
    try:
        for layer, flag in zip(adapters, flags, strict=True):
            names = layer.active_names if adapter_names is None else adapter_names
            held = [name for name in names if name in layer.adapter_vectors]
            layer.set_sampling_flags(dict.fromkeys(held, flag))
        yield
    finally:
        for layer, saved in zip(adapters, layer_flags, strict=True):
            layer.set_sampling_flags(saved)


def noise_states(model, adapters, seed):
    """The states the noise generators of `adapters` start from under `seed`.

    Each layer's state is derived from `seed` and the layer's place among
    all the model's PVeRA layers: independent between layers, and the same
    whichever adapters run.
    """
    if not adapters:  # Every row picked the base model: no noise.
        return []
    places = _stream_places(model, adapters)
    dtype = ops.convert_to_numpy(adapters[0].seed_generator.state.value).dtype
    states = seed_generator_states(seed, max(places) + 1, dtype)
    return [states[place] for place in places]


@contextlib.contextmanager
def sampling_at_inference(model, adapters, seed, flags, adapter_names=None):
    """Switches sampling at inference on (`sampling_switched`), with the
    noise generators at `seed`'s states (`noise_states`), and restores
    everything after.

    Compiled predict functions are dropped on entry and exit (JAX and
    TensorFlow bake the switch into them). The generators get their
    previous states back afterwards, so the run leaves the model's own
    noise streams as they were.
    """
    generators = [layer.seed_generator for layer in adapters]
    saved_states = [np.array(ops.convert_to_numpy(g.state.value)) for g in generators]
    try:
        with sampling_switched(adapters, flags, adapter_names):
            keras_internals.drop_compiled_functions(model)
            states = noise_states(model, adapters, seed)
            for generator, state in zip(generators, states, strict=True):
                generator.state.assign(state)
            yield
    finally:
        for generator, state in zip(generators, saved_states, strict=True):
            generator.state.assign(state)
        keras_internals.drop_compiled_functions(model)


@contextlib.contextmanager
def sampling_off(model):
    """Every adapted layer of `model` uses its latent mean for the duration
    (`predict` gives the mean prediction, whatever `sample_at_inference`
    says), restored after, as `predict_with_uncertainty` restores it.

    Raises:
        ValueError: If `model` has no PVeRA layers.
    """
    adapters = list(adapted_layers_of(model).values())
    with sampling_at_inference(model, adapters, 0, [False] * len(adapters)):
        yield


def _stream_places(model, adapters):
    """Each of `adapters`' place among all the PVeRA layers of `model`."""
    if output_kinds.is_adapted_model(model):
        layers = list(model.adapter_registry.wrappers.values())
    else:
        layers = [layer for _, layer in layer_walk.pvera_layers(model)]
    places = {id(layer): place for place, layer in enumerate(layers)}
    return [places[id(layer)] for layer in adapters]


def repeat_rows(array, copies):
    """`copies` copies of `array` one after the other on the first axis."""
    if copies == 1:
        return array
    return np.concatenate([array] * copies, axis=0)


def draw_samples(predict_copies, batch, n, max_rows):
    """`n` sampled predictions of one input batch.

    The batch is cut into pieces of at most `max_rows` examples; each piece
    is repeated `copies` times per model call (`predict_copies(piece,
    copies)`), `copies` chosen so that no call exceeds `max_rows` rows and
    the calls are as even as possible.

    Returns:
        A tuple `(outputs, leaves)`: the structure of one model output, and
        its flattened leaves, each of shape `(n, batch, ...)`.
    """
    rows = num_rows(batch)
    piece_rows = min(rows, max_rows)
    most_copies = max(1, min(n, max_rows // piece_rows))
    copies = math.ceil(n / math.ceil(n / most_copies))
    pieces, outputs = [], None
    for start in range(0, rows, piece_rows):
        piece = keras.tree.map_structure(
            lambda a, start=start: a[start : start + piece_rows], batch
        )
        size = num_rows(piece)
        draws, remaining = [], n
        while remaining:
            k = min(copies, remaining)
            outputs = predict_copies(piece, k)
            draws.append(_per_copy(outputs, k, size))
            remaining -= k
        pieces.append([np.concatenate(d, axis=0) for d in zip(*draws, strict=True)])
    return outputs, [np.concatenate(p, axis=1) for p in zip(*pieces, strict=True)]


def _per_copy(outputs, copies, size):
    """The leaves of one call's outputs, each reshaped to `(copies, size, ...)`.

    Raises:
        ValueError: Naming an output whose first axis is not the call's
            `copies * size` rows (an output without a batch axis, such as
            SAM's positional embeddings, has no sample per example).
    """
    leaves = []
    for path, output in keras.tree.flatten_with_path(outputs):
        shape = tuple(np.shape(output))
        if shape[:1] != (copies * size,):
            name = "/".join(str(key) for key in path) or "the output"
            raise ValueError(
                "predict_with_uncertainty needs every model output to have "
                f"the batch on its first axis, but output {name!r} has shape "
                f"{shape} for a call on {copies * size} rows. Predict the "
                "outputs that have one (a model selecting them), or draw "
                "passes with `model.sample_at_inference = True` and "
                "`model.predict`."
            )
        leaves.append(np.reshape(output, (copies, size) + shape[1:]))
    return leaves


def predict_with_uncertainty(
    model,
    x,
    n=30,
    *,
    batch_size=None,
    level=0.95,
    seed=None,
    return_samples=False,
    sampled_layers=None,
    adapter_names=None,
    verbose="auto",
):
    """Predicts `n` times with PVeRA's sampling on; returns the statistics.

    Sampling at inference is switched on for the run and restored after it,
    even when an exception interrupts it; compiled predict functions are
    dropped both ways, so `model.predict` afterwards behaves as before.

    The `n` passes are vectorised: a batch is repeated `n` times on the
    batch axis and goes through the model in calls of at most `batch_size`
    rows (examples times copies). Every copy draws its own noise.

    Args:
        model: A model adapted with `keras_pvera.apply` (or any Keras model
            holding `PVeRADense` layers).
        x: Inputs, as for `model.predict`: NumPy arrays (or a list, tuple or
            dict of them, as KerasHub models take), a `tf.data.Dataset`, a
            `keras.utils.PyDataset`, or another iterable of batches.
            Dataset elements may be `x`, `(x,)`, `(x, y)` or
            `(x, y, sample_weight)`.
        n: Number of Monte Carlo passes, a positive integer (1 gives
            `std == 0`, with a warning).
        batch_size: Most rows sent through the model in one call. Defaults
            to `DEFAULT_MAX_ROWS` (32). Arrays are read `batch_size // n`
            examples at a time (at least 1); dataset batches are cut to fit.
        level: Level of the intervals, strictly between 0 and 1.
        seed: A non-negative integer: the same seed, inputs, `batch_size`
            and backend give identical samples. `None` draws a seed from
            Python's `random` module, so calls differ, and
            `keras.utils.set_random_seed` makes them repeatable. Either way
            the layers' own noise streams are left as they were.
        return_samples: Whether the result keeps the samples (leading axis
            `n`). All samples are held in memory during the run either way;
            without this, only the statistics are kept afterwards.
        sampled_layers: Paths of the adapted layers that sample (keys of
            `model.adapted_layers`); the others use their latent mean.
            `None` (the default) samples in all of them.
        adapter_names: `None` (the active adapters run), or one adapter
            name per example (`"__base__"`: the base model) for array (or
            raw task) inputs to a model made by `keras_pvera.apply`: each
            example's samples are those its adapter alone would give it
            with the same `seed` and `batch_size`. The adapted layers are
            then those of the named adapters (for `sampled_layers`).
        verbose: `"auto"` or 1 (progress bar), 2 (one line at the end) or 0
            (silent), as for `model.predict`.

    Returns:
        An `UncertaintyResult`, its arrays shaped like `model.predict(x)`.
        Its `from_logits` says, per output, whether the class statistics
        read it as logits or probabilities by default, from the model: a
        KerasHub task's `activation`, or else the activation of the layer
        producing each output (linear: logits; softmax or sigmoid:
        probabilities; anything else: unknown, read as probabilities if the
        values can be). A `PVeRAModel` outputs what its base model does.

    Raises:
        ValueError: For a bad `n`, `batch_size`, `level`, `seed`,
            `sampled_layers` or `verbose`, empty inputs, a model without PVeRA layers,
            adapter weights holding NaN or infinity, or a model output
            without the batch on its first axis.

    Example:

    >>> import keras_pvera
    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                          keras.layers.Dense(3, activation="softmax")])
    >>> model = keras_pvera.apply(base, rank=4)
    >>> result = predict_with_uncertainty(model, np.ones((2, 4)), n=5,
    ...                                   seed=0, verbose=0)
    >>> result.mean.shape, result.predictive_entropy().shape
    ((2, 3), (2,))
    >>> result.from_logits  # The softmax head outputs probabilities.
    False
    """
    n = checks.checked_integer(n, "n")
    level = check_level(level)
    seed, max_rows = seed_and_rows(seed, batch_size)
    verbose = _check_verbose(verbose)
    with contextlib.ExitStack() as stack:
        names = None  # The batch's adapters, when picked per example.
        if adapter_names is None:
            adapted = adapted_layers_of(model)
            # A KerasHub task's raw inputs through its preprocessor.
            preprocessed = keras_hub_tasks.preprocessed(
                model, x, batch_size=max(1, max_rows // n)
            )
            if preprocessed is not None:
                x = preprocessed
        else:
            x, adapted, names = _inputs_by_row(stack, model, x, adapter_names)
        flags = _sampling_flags(adapted, sampled_layers)
        _warn_if_no_spread(n, adapted, flags)
        if callable(getattr(model, "check_finite", None)):
            model.check_finite()
        outputs, drawn = _draw_all(
            model, x, n, max_rows, seed, adapted, flags, names, verbose
        )
    samples = keras.tree.pack_sequence_as(
        outputs,
        [np.concatenate(parts, axis=1) for parts in zip(*drawn, strict=True)],
    )
    _warn_if_not_finite(samples)
    return UncertaintyResult(
        samples,
        level=level,
        keep_samples=return_samples,
        from_logits=output_kinds.from_logits_like(model, samples),
    )


def _warn_if_no_spread(n, adapted, flags):
    """Warns when the passes cannot differ, so the spread is zero: one pass,
    or no sampling layer that runs its adapters (all disabled)."""
    if n == 1:
        warnings.warn(
            "predict_with_uncertainty with n=1 makes one pass: the spread "
            "(std, intervals, mutual information) is zero, not a measure of "
            "uncertainty. Use n >= 2 passes (the default is 30).",
            stacklevel=3,
        )
        return
    layers = [layer for layer, f in zip(adapted.values(), flags, strict=True) if f]
    if not any(layer.adapter_enabled for layer in layers):
        warnings.warn(
            f"None of the {len(layers)} sampled layers runs its adapter (the "
            "adapters are disabled: `model.disable_adapter()` or "
            "`adapter_enabled = False`), so all passes are the base model's "
            "output and the spread is zero, not a measure of uncertainty. "
            "Enable the adapters to sample them.",
            stacklevel=3,
        )


def _warn_if_not_finite(samples):
    """Warns when sampled outputs hold infinity or NaN, saying why."""
    leaves = [np.asarray(leaf) for leaf in keras.tree.flatten(samples)]
    bad = sum(int(np.sum(~np.isfinite(leaf))) for leaf in leaves)
    if bad:
        total = sum(leaf.size for leaf in leaves)
        warnings.warn(
            f"{bad} of {total} sampled output values are infinite or NaN, "
            "and the statistics computed from them are too. The latent "
            "noise `exp(logvar / 2)` overflows where the log-variance, "
            "`lambda_d * (x @ A.T)`, is large: a large `d_initial`, or "
            "inputs far outside the training data's scale. A smaller "
            "`d_initial`, inputs on the training data's scale, or "
            "`sampled_layers` without the overflowing layers avoid it.",
            stacklevel=3,
        )


def _inputs_by_row(stack, model, x, adapter_names):
    """Inputs packed with each example's adapter, the layers that run, and
    the batch's adapter names.

    Opens the model's `adapters_by_row` context on `stack`.
    """
    if not output_kinds.is_adapted_model(model):
        raise ValueError(
            "`adapter_names` picks named adapters of a model made by "
            "`keras_pvera.apply`; received a model of type "
            f"{type(model).__name__}."
        )
    x = keras_hub_tasks.preprocessed_arrays(model, x)
    count = row_adapters.num_examples(x)
    names, indices = stack.enter_context(model.adapters_by_row(adapter_names, count))
    adapted = model.adapter_registry.layers_of(
        [name for name in names if name != row_adapters.BASE_MODEL]
    )
    return row_adapters.pack(x, indices), adapted, names


def _draw_all(model, x, n, max_rows, seed, adapted, flags, names, verbose):
    """`n` sampled predictions of every batch of `x`: `(outputs, drawn)`,
    one model output's structure and, per batch, its leaves' samples.
    `names`: the adapters picked per example, or `None` (the active ones)."""
    adapters = list(adapted.values())
    batches = InputBatches(x, array_batch_size=max(1, max_rows // n))
    progbar = None
    if verbose:
        progbar = keras.utils.Progbar(
            batches.num_batches, verbose=verbose, unit_name="step"
        )
    outputs, drawn = None, []
    sampling = [layer for layer, flag in zip(adapters, flags, strict=True) if flag]
    predict_copies = _copies_predictor(model, sampling, names)
    with sampling_at_inference(model, adapters, seed, flags, names):
        for step, batch in enumerate(batches):
            if num_rows(batch) > 0:
                outputs, leaves = draw_samples(predict_copies, batch, n, max_rows)
                drawn.append(leaves)
            if progbar is not None:
                progbar.update(step + 1)
    if not drawn:
        raise ValueError("`x` holds no examples to predict.")
    if progbar is not None and batches.num_batches is None:
        progbar.update(step + 1, finalize=True)
    return outputs, drawn


def _copies_predictor(model, sampling, names):
    """`predict_copies(piece, copies)`: the model's outputs for `piece`
    repeated `copies` times.

    A model made by `keras_pvera.apply` takes the piece once and repeats
    it inside, where the first sampling layer needs it (`shared_prefix`);
    other models, and batches whose examples pick their adapters
    (`names`), get the repeated piece.
    """
    if names is not None or not output_kinds.is_adapted_model(model):
        return _repeated_batch_predictor(model)
    return _shared_prefix_predictor(model, sampling)


def _repeated_batch_predictor(model):
    """The repeated piece through the whole model."""

    def predict_copies(piece, copies):
        return model.predict_on_batch(
            keras.tree.map_structure(lambda a: repeat_rows(a, copies), piece)
        )

    return predict_copies


def _shared_prefix_predictor(model, sampling):
    """The piece once through the layers before `sampling`, then repeated."""
    holds_sampling = shared_prefix.sampling_holders(sampling)
    generators = [layer.seed_generator for layer in sampling]
    traced_copies = [None]

    def predict_copies(piece, copies):
        if copies != traced_copies[0]:
            # A compiled predict function holds the repetition it traced.
            keras_internals.drop_compiled_functions(model)
            traced_copies[0] = copies
        with shared_prefix.repeating(copies, holds_sampling, generators):
            return model.predict_on_batch(piece)

    return predict_copies
