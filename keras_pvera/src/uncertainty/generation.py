"""Uncertainty of generated text: `n` sampled generations of each prompt.

With sampling on in the adapters, a causal LM's generations of one prompt
differ from run to run. `generate_with_uncertainty` makes `n` of them per
prompt (each with its own adapter noise, the whole call seeded), and
reports how much they agree and how uncertain the model is about the
tokens it generated:

- `agreement`: the share of the `n` generations equal to the most common
  one (`most_common`), 1 when all agree.
- per generated token, from `n` teacher-forced passes of the generation
  (sampling on; `p_1..p_n` the next-token distributions of the passes, the
  softmax of the model's logits): the predictive entropy `H[mean p]`, the
  expected entropy `mean H[p]` and the mutual information
  `H[mean p] - mean H[p]`, in nats.
- per prompt, the mean of these over each generation's generated tokens,
  then over the `n` generations (each generation counts once, whatever its
  length).
"""

import collections
import contextlib
import warnings

import numpy as np
from keras import ops

from keras_pvera.src.layers import row_adapters
from keras_pvera.src.layers.seeds import seed_generator_states
from keras_pvera.src.uncertainty.monte_carlo import draw_samples
from keras_pvera.src.uncertainty.monte_carlo import repeat_rows
from keras_pvera.src.uncertainty.monte_carlo import seed_and_rows
from keras_pvera.src.uncertainty.sampled_model import read_model
from keras_pvera.src.uncertainty.sampling_state import sampling_at_inference
from keras_pvera.src.uncertainty.statistics import entropy_of_probabilities
from keras_pvera.src.uncertainty.statistics import log_softmax
from keras_pvera.src.utils import checks
from keras_pvera.src.utils import keras_hub_tasks


class GenerationUncertainty:
    """`n` sampled generations per prompt, their agreement and uncertainty.

    `generate_with_uncertainty` returns one; see it for the definitions.
    Arrays have the prompts on their first axis and, where they have one,
    the `n` generations on their second.

    Attributes:
        n: Generations per prompt.
        seed: The seed the call used (drawn when it was given `None`):
            the same seed gives the same result.
        generations: Per prompt, the list of its `n` generated texts (with
            the prompt, or without it under `strip_prompt=True`).
        most_common: Per prompt, its most common generation (the first to
            come up among those tied).
        agreement: `(prompts,)`: the share of the `n` generations equal to
            `most_common`, from `1 / n` to 1.
        token_ids: `(prompts, n, length)`: the generations' token ids, the
            prompt included.
        generated: `(prompts, n, length)` booleans: the generated tokens
            (the stop token included, the prompt and padding not).
        token_predictive_entropy: `(prompts, n, length)`: `H[mean p]` of
            the distribution each generated token was drawn from; 0 where
            `generated` is False.
        token_expected_entropy: `mean H[p]`, arranged the same way.
        token_mutual_information: `H[mean p] - mean H[p]` (rounding errors
            below 0 read as 0), arranged the same way.
        predictive_entropy: `(prompts,)`: the mean of
            `token_predictive_entropy` over each generation's generated
            tokens, then over the `n` generations.
        expected_entropy: `(prompts,)`, likewise.
        mutual_information: `(prompts,)`, likewise.
    """

    def __init__(self, n, seed, generations, token_ids, generated, token_statistics):
        self.n = n
        self.seed = seed
        self.generations = generations
        self.token_ids = token_ids
        self.generated = generated
        self.most_common, self.agreement = [], []
        for texts in generations:
            text, count = collections.Counter(texts).most_common(1)[0]
            self.most_common.append(text)
            self.agreement.append(count / len(texts))
        self.agreement = np.array(self.agreement)
        entropy, expected = token_statistics
        self.token_predictive_entropy = entropy
        self.token_expected_entropy = expected
        # Never negative (Jensen's inequality): a rounding error below 0 is 0.
        self.token_mutual_information = np.maximum(entropy - expected, 0.0)
        tokens = np.sum(generated, axis=-1)

        def per_prompt(values):
            return np.mean(np.sum(values, axis=-1) / tokens, axis=-1)

        self.predictive_entropy = per_prompt(self.token_predictive_entropy)
        self.expected_entropy = per_prompt(self.token_expected_entropy)
        self.mutual_information = per_prompt(self.token_mutual_information)

    def __repr__(self):
        return (
            f"GenerationUncertainty(prompts={len(self.generations)}, n={self.n}, "
            f"seed={self.seed})"
        )

    def __str__(self):
        lines = ["agreement  entropy  mutual information  most common"]
        for i, text in enumerate(self.most_common):
            lines.append(
                f"{self.agreement[i]:9.2f}  {self.predictive_entropy[i]:7.4f}  "
                f"{self.mutual_information[i]:18.4f}  {text!r}"
            )
        return "\n".join(lines)


def _causal_lm_of(parts):
    """The KerasHub `CausalLM` that the model (`parts`, its `SampledModel`)
    adapts, with its preprocessor.

    Raises:
        ValueError: Naming what the model is instead.
    """
    causal_lm_class = keras_hub_tasks.keras_hub_model_class("CausalLM")
    task = parts.task if parts.named_adapters else None
    if task is None or not isinstance(task, causal_lm_class):
        what = type(task if task is not None else parts.model).__name__
        raise ValueError(
            "generate_with_uncertainty needs a KerasHub CausalLM adapted with "
            "keras_pvera.apply (`keras_pvera.apply(causal_lm, ...)`, where "
            "`causal_lm` is a `keras_hub.models.CausalLM` such as "
            f"`GPT2CausalLM`). Received a model adapting a {what}."
            if task is not None
            else "generate_with_uncertainty needs a KerasHub CausalLM adapted "
            "with keras_pvera.apply (`keras_pvera.apply(causal_lm, ...)`). "
            f"Received a model of type {what}."
        )
    if task.preprocessor is None:
        raise ValueError(
            "generate_with_uncertainty takes raw prompts, so the "
            f"{type(task).__name__} needs its preprocessor: build it with "
            "one (`from_preset` attaches it, or `preprocessor=...`). This "
            "one has "
            "`preprocessor=None`."
        )
    return task


def _stop_token_ids(preprocessor, stop_token_ids):
    """`"auto"` read as KerasHub's `generate` reads it: the end token(s)."""
    if not isinstance(stop_token_ids, str) or stop_token_ids != "auto":
        return stop_token_ids
    tokenizer = preprocessor.tokenizer
    ids = [tokenizer.end_token_id]
    if hasattr(tokenizer, "end_token2_id"):
        ids.append(tokenizer.end_token2_id)
    return ids


def _prompt_inputs(preprocessor, prompts, max_length):
    """The prompts as the task's generate inputs (NumPy arrays).

    Raises:
        ValueError: For a single prompt rather than a list, or a prompt
            leaving no room to generate within `max_length` tokens.
    """
    keras_hub_tasks.check_batched(prompts)
    inputs = preprocessor.generate_preprocess(prompts, sequence_length=max_length)
    inputs = {key: np.asarray(ops.convert_to_numpy(v)) for key, v in inputs.items()}
    lengths = np.sum(inputs["padding_mask"], axis=1)
    length = inputs["token_ids"].shape[1]
    full = np.flatnonzero(lengths >= length)
    if full.size:
        raise ValueError(
            f"Prompt {int(full[0])} fills all {length} tokens of `max_length` "
            f"({int(lengths[full[0]])} tokens), leaving none to generate. "
            f"Pass a larger `max_length` (at most the backbone's sequence "
            f"length). Received: max_length={max_length!r}"
        )
    return inputs


@contextlib.contextmanager
def _seeded_sampler(sampler, seed):
    """The sampler's own noise streams (a random sampler's) start from
    states derived from `seed`, and get their states back afterwards."""
    variables = list(getattr(sampler, "variables", []))
    saved = [np.array(ops.convert_to_numpy(v.value)) for v in variables]
    try:
        if variables:
            # [seed, 1]: independent of the adapters' streams, from `seed`.
            states = seed_generator_states([seed, 1], len(variables), saved[0].dtype)
            for variable, state in zip(variables, states, strict=True):
                variable.assign(state)
        yield
    finally:
        for variable, state in zip(variables, saved, strict=True):
            variable.assign(state)


@contextlib.contextmanager
def _without_preprocessor(task):
    """The task takes and gives token ids for the duration, as KerasHub's
    `task.preprocessor = None` makes it; its preprocessor comes back after."""
    preprocessor = task.preprocessor
    task.preprocessor = None
    try:
        yield
    finally:
        task.preprocessor = preprocessor


def _generated(model, inputs, n, max_rows, names, generate_kwargs):
    """`n` sampled generations of every prompt: `(token_ids, padding_mask,
    generated)`, each `(prompts, n, length)`; `generated` marks the tokens
    after the prompt."""
    rows = np.arange(len(inputs["token_ids"]))

    def generate_copies(piece, copies):
        x = {key: repeat_rows(value, copies) for key, value in piece["x"].items()}
        kwargs = dict(generate_kwargs)
        if names is not None:
            kwargs["adapter_names"] = [
                names[i] for i in repeat_rows(piece["row"], copies)
            ]
        outputs = model.generate(x, **kwargs)
        return {key: np.asarray(outputs[key]) for key in ("token_ids", "padding_mask")}

    _, (padding_mask, token_ids) = draw_samples(
        generate_copies, {"x": inputs, "row": rows}, n, max_rows
    )
    # Prompts first: (prompts, n, length).
    token_ids = np.swapaxes(token_ids, 0, 1)
    padding_mask = np.swapaxes(padding_mask.astype(bool), 0, 1)
    generated = padding_mask & ~inputs["padding_mask"][:, None, :].astype(bool)
    return token_ids, padding_mask, generated


def _scored(model, sequences, n, max_rows, indices):
    """Per-position `H[mean p]` and `mean H[p]` of `n` passes of each
    sequence (`(rows, length, vocabulary)` logits from each pass), rows
    `max_rows` at a time; `indices`: each row's adapter, or `None`."""
    rows = len(sequences["token_ids"])
    entropy, expected = [], []
    for start in range(0, rows, max_rows):
        piece = {
            key: value[start : start + max_rows] for key, value in sequences.items()
        }
        if indices is not None:
            piece = row_adapters.pack(piece, indices[start : start + max_rows])
        mean_p, mean_entropy = 0.0, 0.0
        for _ in range(n):
            logits = ops.convert_to_numpy(model.predict_on_batch(piece))
            log_p = log_softmax(np.asarray(logits, dtype="float64"))
            p = np.exp(log_p)
            mean_p = mean_p + p / n
            mean_entropy = mean_entropy - np.sum(p * log_p, axis=-1) / n
        entropy.append(entropy_of_probabilities(mean_p))
        expected.append(mean_entropy)
    return np.concatenate(entropy), np.concatenate(expected)


def generate_with_uncertainty(
    model,
    inputs,
    n=10,
    *,
    max_length=None,
    stop_token_ids="auto",
    strip_prompt=False,
    seed=None,
    adapter_names=None,
    batch_size=None,
    **kwargs,
):
    """Generates `n` times per prompt with PVeRA's sampling on; returns the
    generations, their agreement and the uncertainty of generated tokens.

    For a KerasHub `CausalLM` with its preprocessor, adapted with
    `keras_pvera.apply`. Sampling at inference is switched on in the
    adapters for the call and restored after, as `predict_with_uncertainty`
    does; the task's sampler (`causal_lm.compile(sampler=...)`) picks each
    token, so with `"greedy"` only the adapters' noise makes the
    generations differ, and with a random sampler its draws add to it.

    The `n` generations of a prompt are the task's `generate` on the prompt
    repeated `n` times (at most `batch_size` rows a call): every copy draws
    its own adapter noise at every step. Each generated token is then scored
    teacher-forced: `n` sampled forward passes over each whole generation
    give `n` next-token distributions `p_1..p_n` (the softmax of the
    logits) at the position that generated it, and

        predictive entropy  = H[mean_k p_k]
        expected entropy    = mean_k H[p_k]
        mutual information  = H[mean_k p_k] - mean_k H[p_k]

    in nats. The generated tokens are those after the prompt, up to and
    including the stop token. A prompt's figures are the mean over each
    generation's generated tokens, then over its `n` generations. (A
    calibration temperature set by `keras_pvera.calibrate` scales the
    scored logits, as it does `predict`'s; the generation is the task's.)

    Args:
        model: A KerasHub `CausalLM` (with its preprocessor) adapted with
            `keras_pvera.apply`.
        inputs: The prompts: a list (or array) of strings, as the task's
            `generate` takes them, one per prompt.
        n: Generations per prompt (and sampled passes scoring each), a
            positive integer. 1 makes one generation, with agreement 1 and
            mutual information 0 (with a warning).
        max_length: The most tokens of a generation, prompt included, as
            for the task's `generate`; defaults to the preprocessor's
            `sequence_length`.
        stop_token_ids: As for the task's `generate`: `"auto"` (the
            tokenizer's end token), `None` (generate `max_length` tokens)
            or a list of token ids.
        strip_prompt: As for the task's `generate`: whether `generations`
            holds only the generated text, without the prompt.
        seed: A non-negative integer: the same seed, prompts, `batch_size`
            and backend give the same result. `None` draws one from
            Python's `random` module (`result.seed` says which). The
            layers' and the sampler's own noise streams are left as they
            were.
        adapter_names: `None` (the active adapters), or one adapter name
            per prompt (`"__base__"`: the base model): each prompt's
            generations and figures are those its adapter alone gives it
            with the same `seed`.
        batch_size: Most rows (prompts times copies, or generations being
            scored) in one model call; defaults to 32. Scoring holds
            `batch_size x length x vocabulary` logits a few times: lower it
            for a large vocabulary.
        **kwargs: Passed on to the task's `generate`.

    Returns:
        A `GenerationUncertainty`: `generations`, `most_common`,
        `agreement`, `predictive_entropy`, `expected_entropy`,
        `mutual_information` per prompt, and the per-token figures.

    Raises:
        ValueError: For a model that is not an adapted KerasHub `CausalLM`
            with a preprocessor, a single prompt rather than a list, a bad
            `n`, `seed` or `batch_size`, `adapter_names` not one loaded
            name per prompt, or a prompt leaving no room to generate.

    Example:

    >>> result = keras_pvera.generate_with_uncertainty(  # doctest: +SKIP
    ...     model, ["what is the capital of france?"], n=10, seed=0)
    >>> result.most_common, result.agreement  # doctest: +SKIP
    (['what is the capital of france? paris'], array([0.9]))
    """
    parts = read_model(model)
    task = _causal_lm_of(parts)
    n = checks.checked_integer(n, "n")
    seed, max_rows = seed_and_rows(seed, batch_size)
    preprocessor = task.preprocessor
    prompts = _prompt_inputs(preprocessor, inputs, max_length)
    names, adapted = _adapters_of_prompts(
        parts, adapter_names, len(prompts["token_ids"])
    )
    _warn_if_one_generation(n)
    model.check_finite()
    generate_kwargs = dict(
        kwargs, stop_token_ids=_stop_token_ids(preprocessor, stop_token_ids)
    )
    with _generating(parts, task, seed, list(adapted.values()), names):
        token_ids, padding_mask, generated = _generated(
            model, prompts, n, max_rows, names, generate_kwargs
        )
        statistics = _token_statistics(
            model, prompts, token_ids, padding_mask, generated, n, max_rows, names
        )
    _warn_if_not_finite(statistics)
    generations = _texts(
        preprocessor, token_ids, generated if strip_prompt else padding_mask
    )
    return GenerationUncertainty(n, seed, generations, token_ids, generated, statistics)


def _adapters_of_prompts(parts, adapter_names, count):
    """`(names, adapted)`: one adapter name per prompt (`None`: the active
    adapters), and `{path: PVeRADense}` of the layers those adapters adapt.

    Raises:
        ValueError: If the model has no adapted layers, or `adapter_names`
            is not one loaded name per prompt.
    """
    if adapter_names is None:
        return None, parts.active_layers()
    model = parts.model
    # Checks the names (loaded, one per prompt) before any work.
    distinct, _ = row_adapters.index_rows(
        adapter_names, model.adapter_names, count, model.merged_adapters
    )
    adapted = parts.layers_of(
        [name for name in distinct if name != row_adapters.BASE_MODEL]
    )
    return list(adapter_names), adapted


def _warn_if_one_generation(n):
    if n == 1:
        warnings.warn(
            "generate_with_uncertainty with n=1 makes one generation per "
            "prompt: agreement is 1 and mutual information 0, not a measure "
            "of uncertainty. Use n >= 2.",
            stacklevel=3,
        )


@contextlib.contextmanager
def _generating(parts, task, seed, adapters, names):
    """The task takes token ids, its sampler draws from `seed`'s states and
    the `adapters` sample at inference from `seed`'s noise (each prompt's
    adapter of `names`, or the active ones), all restored after."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_without_preprocessor(task))
        stack.enter_context(_seeded_sampler(task.sampler, seed))
        if adapters:
            stack.enter_context(
                sampling_at_inference(
                    parts,
                    adapters,
                    seed,
                    True,
                    None if names is None else tuple(dict.fromkeys(names)),
                )
            )
        yield


def _warn_if_not_finite(statistics):
    if not all(np.all(np.isfinite(values)) for values in statistics):
        warnings.warn(
            "Some generated tokens' entropies are NaN: the sampled logits "
            "overflowed. The latent noise `exp(logvar / 2)` overflows where "
            "the log-variance, `lambda_d * (x @ A.T)`, is large (a large "
            "`d_initial`, or inputs far outside the training data's scale); "
            "`PVeRAConfig(max_log_variance=20)` bounds it.",
            stacklevel=3,
        )


def _texts(preprocessor, token_ids, padding_mask):
    """Per prompt, the texts of its generations `(prompts, n, length)`
    (the tokens `padding_mask` keeps)."""
    count, n, _ = token_ids.shape
    texts = preprocessor.generate_postprocess(
        {
            "token_ids": token_ids.reshape(count * n, -1),
            "padding_mask": padding_mask.reshape(count * n, -1),
        }
    )
    texts = [_as_text(text) for text in texts]
    return [texts[i * n : (i + 1) * n] for i in range(count)]


def _as_text(text):
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def _token_statistics(
    model, prompts, token_ids, padding_mask, generated, n, max_rows, names
):
    """`(H[mean p], mean H[p])` of every generated token, `(prompts, n,
    length)`, 0 elsewhere: the distribution at position `t - 1` of the
    teacher-forced passes drew token `t`."""
    count, _, length = token_ids.shape
    sequences = {key: np.repeat(value, n, axis=0) for key, value in prompts.items()}
    sequences["token_ids"] = token_ids.reshape(count * n, length)
    sequences["padding_mask"] = padding_mask.reshape(count * n, length)
    with contextlib.ExitStack() as stack:
        indices = None
        if names is not None:
            _, indices = stack.enter_context(
                model.adapters_by_row(list(np.repeat(names, n)), count * n)
            )
        entropy, expected = _scored(model, sequences, n, max_rows, indices)
    # Position t - 1 drew token t; nothing draws the first token.
    statistics = []
    for values in (entropy, expected):
        shifted = np.zeros((count * n, length))
        shifted[:, 1:] = values[:, :-1]
        shifted = shifted.reshape(count, n, length)
        statistics.append(np.where(generated, shifted, 0.0))
    return tuple(statistics)
