"""Monte Carlo prediction with a PVeRA model.

With sampling at inference switched on, every pass through a PVeRA-adapted
model draws new latent noise, so `n` passes give `n` samples of the
prediction. `predict_with_uncertainty` draws them fast (the batch is
repeated `n` times and sent through the model in chunks of at most
`batch_size` rows, default `DEFAULT_MAX_ROWS`), and returns an
`UncertaintyResult`: mean, standard deviation, sample intervals, a
t-distribution confidence interval of the mean, and, for class outputs,
predictive entropy, expected entropy and mutual information (computed in
`statistics`). The run asks the model what it needs once, through
`sampled_model.read_model`.
"""

import contextlib
import math
import random
import warnings

import keras
import numpy as np

from keras_pvera.src.layers import row_adapters
from keras_pvera.src.uncertainty import output_kinds
from keras_pvera.src.uncertainty import sampling_state
from keras_pvera.src.uncertainty import shared_prefix
from keras_pvera.src.uncertainty.input_batches import InputBatches
from keras_pvera.src.uncertainty.input_batches import num_rows
from keras_pvera.src.uncertainty.sampled_model import read_model
from keras_pvera.src.uncertainty.sampling_state import sampling_at_inference
from keras_pvera.src.uncertainty.statistics import UncertaintyResult
from keras_pvera.src.uncertainty.statistics import check_level
from keras_pvera.src.utils import array_inputs
from keras_pvera.src.utils import checks
from keras_pvera.src.utils import keras_hub_tasks

# Most rows (examples times Monte Carlo copies) sent through the model in one
# call, unless `batch_size` says otherwise; Keras' own default predict batch.
# Measured with `benchmarks/benchmark_uncertainty.py` (MiniLM BERT + PVeRA
# r=256, 8 examples x 128 tokens, n=8, torch, 2 CPU cores, four runs on a
# lightly loaded machine): n separate passes beat one call over the n-times repeated
# batch (64 rows) by 8-18%, and calls of 16 or 32 rows took 0.89-1.08x the
# time of the faster of those two (runs vary by about 10%). 32 rather than
# 16 halves the calls, which is what small models spend their time on.
DEFAULT_MAX_ROWS = 32


def check_seed(seed):
    """`seed` as an int, `None` kept, or a `ValueError` naming it."""
    if seed is None:
        return None
    expected = "None or a non-negative integer"
    return checks.checked_integer(seed, "seed", minimum=0, expected=expected)


def drawn_seed(seed):
    """`seed` checked (`check_seed`), or a random one for `None`, which the
    run reports so that it can be repeated."""
    seed = check_seed(seed)
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    return seed


def seed_and_rows(seed, batch_size):
    """A sampled run's `(seed, max_rows)`: `seed` checked (a random one for
    `None`) and the rows per model call (`DEFAULT_MAX_ROWS` for `None`)."""
    max_rows = (
        DEFAULT_MAX_ROWS
        if batch_size is None
        else checks.checked_integer(batch_size, "batch_size")
    )
    return drawn_seed(seed), max_rows


def _check_verbose(verbose):
    if verbose == "auto":
        return 1
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(
            f'`verbose` must be "auto", 0, 1 or 2. Received: verbose={verbose!r}'
        )
    return int(verbose)


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
    parts = read_model(model)
    with contextlib.ExitStack() as stack:
        x, adapted, names = _model_inputs(
            stack, parts, x, adapter_names, batch_size=max(1, max_rows // n)
        )
        flags = _sampling_flags(adapted, sampled_layers)
        _warn_if_no_spread(n, adapted, flags)
        if parts.named_adapters:
            model.check_finite()
        outputs, drawn = _draw_all(
            parts, x, n, max_rows, seed, adapted, flags, names, verbose
        )
    samples = keras.tree.pack_sequence_as(
        outputs,
        [np.concatenate(pieces, axis=1) for pieces in zip(*drawn, strict=True)],
    )
    _warn_if_not_finite(samples)
    return UncertaintyResult(
        samples,
        level=level,
        keep_samples=return_samples,
        from_logits=output_kinds.from_logits_like(parts.output_kinds, samples),
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
            "inputs far outside the training data's scale. A bound, "
            "`PVeRAConfig(max_log_variance=20)`, a smaller `d_initial`, "
            "inputs on the training data's scale, or `sampled_layers` "
            "without the overflowing layers avoid it.",
            stacklevel=3,
        )


def _model_inputs(stack, parts, x, adapter_names, batch_size):
    """`(inputs, adapted, names)`: the inputs as the model takes them, the
    adapted layers that run, and the adapters picked per example (`None`:
    the active adapters run).

    A KerasHub task's raw inputs go through its preprocessor (a dataset of
    `batch_size` examples a batch, or, with `adapter_names`, arrays). With
    `adapter_names`, the inputs are packed with each example's adapter,
    and the model's `adapters_by_row` context is opened on `stack`.
    """
    if adapter_names is None:
        adapted = parts.active_layers()
        batches = keras_hub_tasks.task_batches(parts.task, x, batch_size=batch_size)
        return (x if batches is None else batches), adapted, None
    if not parts.named_adapters:
        raise ValueError(
            "`adapter_names` picks named adapters of a model made by "
            "`keras_pvera.apply`; received a model of type "
            f"{type(parts.model).__name__}."
        )
    x = keras_hub_tasks.task_arrays(parts.task, x)
    count = array_inputs.num_examples(x)
    names, indices = stack.enter_context(
        parts.model.adapters_by_row(adapter_names, count)
    )
    adapted = parts.layers_of(
        [name for name in names if name != row_adapters.BASE_MODEL]
    )
    return row_adapters.pack(x, indices), adapted, names


def _draw_all(parts, x, n, max_rows, seed, adapted, flags, names, verbose):
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
    predict_copies = _copies_predictor(parts, sampling, names)
    with sampling_at_inference(parts, adapters, seed, flags, names):
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


def _copies_predictor(parts, sampling, names):
    """`predict_copies(piece, copies)`: the model's outputs for `piece`
    repeated `copies` times.

    A model made by `keras_pvera.apply` takes the piece once and repeats
    it inside, where the first sampling layer needs it (`shared_prefix`);
    other models, and batches whose examples pick their adapters
    (`names`), get the repeated piece.
    """
    if names is not None or not parts.named_adapters:
        return _repeated_batch_predictor(parts.model)
    return _shared_prefix_predictor(parts.model, sampling)


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
            sampling_state.drop_traces(model)
            traced_copies[0] = copies
        with shared_prefix.repeating(copies, holds_sampling, generators):
            return model.predict_on_batch(piece)

    return predict_copies
