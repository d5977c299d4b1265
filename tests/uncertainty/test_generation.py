"""`generate_with_uncertainty`: sampled generations of a PVeRA-adapted
KerasHub causal LM, their agreement and the uncertainty of their tokens.

A tiny GPT-2 `CausalLM` with its preprocessor over an in-memory byte-pair
tokenizer (the builder of tests/hub/hub_architectures.py), a
greedy sampler so that only the adapters' noise varies, and a few tokens.
"""

import collections

import keras
import numpy as np
import pytest

import keras_pvera

keras_hub = pytest.importorskip("keras_hub")

from hub_architectures import gpt2  # noqa: E402

PROMPTS = ["a dog ran", "a cat"]
MAX_LENGTH = 7  # Prompts of 3 and 4 tokens (the start token included).
# Each seed gives different noise, so what is asserted must hold for every
# one: seeds 0, 1 and 2 pass on torch, JAX and TensorFlow
# (KERAS_PVERA_FULL_MATRIX=1 runs them all). JAX and TensorFlow compile the
# generate loop and the scoring passes anew in each call (about 6 s a call
# on JAX on 2 CPU cores), so their runs keep seed 0: the code is the same
# for every seed.
SEEDS = [
    0,
    pytest.param(1, marks=pytest.mark.default_backend_only),
    pytest.param(2, marks=pytest.mark.default_backend_only),
]


def adapted_gpt2(lambda_b_scale, extra_adapter=False):
    """A GPT-2 causal LM, every dense layer adapted: `lambda_d = 1`, and an
    output scale `lambda_b` of N(0, lambda_b_scale**2) (0: the adapter adds
    nothing, sampled or not)."""
    causal_lm = gpt2(preprocessor=True)
    causal_lm.compile(sampler="greedy")
    model = keras_pvera.apply(causal_lm, rank=4, target="all", seed=0)
    if extra_adapter:
        model.add_adapter("other", rank=4, seed=0, target="all")
    rng = np.random.default_rng(0)
    for layer in model.adapter_registry.wrappers.values():
        for vectors in layer.adapter_vectors.values():
            vectors.lambda_d.assign(np.ones(vectors.lambda_d.shape, "float32"))
            scale = lambda_b_scale * rng.normal(size=vectors.lambda_b.shape)
            vectors.lambda_b.assign(scale.astype("float32"))
    return causal_lm, model


def generate(model, seed, **kwargs):
    return keras_pvera.generate_with_uncertainty(
        model, PROMPTS, n=3, seed=seed, max_length=MAX_LENGTH, **kwargs
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_generations_agree_when_the_adapter_adds_no_variance(seed):
    # Sampling on, with latent noise, but lambda_b = 0: the adapter adds
    # nothing, so every generation is the base model's greedy one.
    causal_lm, model = adapted_gpt2(lambda_b_scale=0.0)
    base = causal_lm.generate(PROMPTS, max_length=MAX_LENGTH)
    result = generate(model, seed)
    assert result.generations == [[text] * 3 for text in base]
    assert result.most_common == base
    np.testing.assert_array_equal(result.agreement, [1.0, 1.0])
    np.testing.assert_allclose(result.mutual_information, 0.0, atol=1e-12)
    assert np.all(result.predictive_entropy > 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_large_variance_makes_generations_differ_and_the_seed_repeats_them(seed):
    _, model = adapted_gpt2(lambda_b_scale=3.0)
    result = generate(model, seed)
    assert np.all(result.agreement < 1.0)
    assert np.all(result.mutual_information > 0)
    assert [len(texts) for texts in result.generations] == [3, 3]
    for texts, common, share in zip(
        result.generations, result.most_common, result.agreement, strict=True
    ):
        assert collections.Counter(texts).most_common(1)[0][0] == common
        assert share == texts.count(common) / 3
    # The model's method is the same call.
    again = model.generate_with_uncertainty(
        PROMPTS, n=3, seed=seed, max_length=MAX_LENGTH
    )
    assert again.generations == result.generations
    np.testing.assert_array_equal(again.token_ids, result.token_ids)
    np.testing.assert_array_equal(again.mutual_information, result.mutual_information)
    # The model's own sampling switch is left as it was.
    assert model.sample_at_inference is False


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def entropy(p):
    return -np.sum(p * np.log(p), axis=-1)


# The torch run only: past the model's logits, recorded here, the figures
# are NumPy's on every backend (this test passed on all three, 2026-12-07).
@pytest.mark.default_backend_only
def test_entropy_and_mutual_information_equal_numpy_from_the_pass_logits():
    _, model = adapted_gpt2(lambda_b_scale=3.0)
    passes = []
    predict_on_batch = model.predict_on_batch

    def recording(x):
        logits = predict_on_batch(x)
        passes.append(np.asarray(keras.ops.convert_to_numpy(logits), "float64"))
        return logits

    model.predict_on_batch = recording
    # No stop token: every position after the prompt is generated.
    result = generate(model, 0, stop_token_ids=None)
    del model.predict_on_batch

    assert len(passes) == 3  # n passes over the 2 x 3 generations at once.
    p = softmax(np.stack(passes))  # (passes, prompt x generation, length, vocab)
    predictive = entropy(p.mean(axis=0))
    expected = entropy(p).mean(axis=0)
    prompt_lengths = np.array([4, 3])
    length = MAX_LENGTH
    generated = np.arange(length)[None, :] >= prompt_lengths[:, None]
    np.testing.assert_array_equal(
        result.generated, np.repeat(generated[:, None, :], 3, axis=1)
    )
    for values, token_values, per_prompt in (
        (predictive, result.token_predictive_entropy, result.predictive_entropy),
        (expected, result.token_expected_entropy, result.expected_entropy),
        (
            predictive - expected,
            result.token_mutual_information,
            result.mutual_information,
        ),
    ):
        values = values.reshape(2, 3, length)
        for i, start in enumerate(prompt_lengths):
            # Token t was drawn from the distribution at position t - 1.
            drawn = values[i, :, start - 1 : length - 1]
            np.testing.assert_allclose(
                token_values[i, :, start:], drawn, rtol=1e-6, atol=1e-9
            )
            np.testing.assert_array_equal(token_values[i, :, :start], 0.0)
            assert per_prompt[i] == pytest.approx(drawn.mean(), rel=1e-6)
    assert np.all(result.mutual_information > 0)


# The torch run only (it passed on all three, 2026-12-07): three compiled
# generate loops, about 16 s on JAX. Per-prompt adapters in `generate` and
# in sampled passes run on every backend in tests/hub/test_keras_hub.py and
# tests/models/test_adapters_by_row.py.
@pytest.mark.default_backend_only
def test_each_prompt_gets_what_its_adapter_alone_gives_it():
    _, model = adapted_gpt2(lambda_b_scale=3.0, extra_adapter=True)
    names = ["other", "__base__"]
    mixed = generate(model, 0, adapter_names=names)
    model.set_adapter("other")
    other = generate(model, 0)
    model.set_adapter("default")
    assert mixed.generations[0] == other.generations[0]
    for name in ("mutual_information", "predictive_entropy", "expected_entropy"):
        assert getattr(mixed, name)[0] == pytest.approx(
            getattr(other, name)[0], rel=1e-5
        )
    # The base model's rows: its greedy generation, every time.
    with model.disable_adapter():
        base = model.generate(PROMPTS, max_length=MAX_LENGTH)
    assert mixed.generations[1] == [base[1]] * 3
    assert mixed.agreement[1] == 1.0
    assert mixed.mutual_information[1] == pytest.approx(0.0, abs=1e-12)
    assert mixed.agreement[0] < 1.0


def test_bad_inputs_are_refused():
    causal_lm, model = adapted_gpt2(lambda_b_scale=0.0)
    with pytest.raises(ValueError, match="`n` must be a positive integer"):
        keras_pvera.generate_with_uncertainty(model, PROMPTS, n=0)
    with pytest.raises(ValueError, match=r"Received a single str: 'a dog ran'"):
        keras_pvera.generate_with_uncertainty(model, "a dog ran", n=2)
    with pytest.raises(ValueError, match="one name per example: 2 examples, 1"):
        keras_pvera.generate_with_uncertainty(
            model, PROMPTS, n=2, adapter_names=["default"]
        )
    with pytest.raises(ValueError, match="not loaded: 'missing'"):
        keras_pvera.generate_with_uncertainty(
            model, PROMPTS, n=2, adapter_names=["missing", "default"]
        )
    with pytest.raises(ValueError, match="leaving none to generate"):
        keras_pvera.generate_with_uncertainty(model, PROMPTS, n=2, max_length=4)
    with pytest.raises(ValueError, match="needs a KerasHub CausalLM.*type GPT2"):
        keras_pvera.generate_with_uncertainty(causal_lm, PROMPTS, n=2)
    dense = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(3)]
    )
    with pytest.raises(ValueError, match="type PVeRAModel"):
        keras_pvera.generate_with_uncertainty(keras_pvera.apply(dense, rank=2), PROMPTS)
    no_preprocessor = keras_pvera.apply(gpt2(), rank=2)
    with pytest.raises(ValueError, match="needs its preprocessor"):
        keras_pvera.generate_with_uncertainty(no_preprocessor, PROMPTS)
