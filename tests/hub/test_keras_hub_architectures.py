"""PVeRA on a matrix of KerasHub architectures: a usage catalogue.

Each architecture is built tiny (hidden size 16, 1 or 2 layers, a
vocabulary of 64, images of 28 or 32 pixels) from its constructor
arguments, with random weights and nothing downloaded, as the model a user
would adapt: a text classifier for encoders, a `CausalLM` for decoders, a
`Seq2SeqLM` for BART and T5, an image classifier for ViT and MiT, and the
backbone where KerasHub 0.32 has no task (ELECTRA, Whisper) or for feature
extractors (DINOv2, DINOv3, CLIP, SAM). Checks 1 to 7 build every task
without a preprocessor, so inputs are token ids and images; check 8 builds
the 21 text tasks again with their preprocessor, as `from_preset` gives it,
over an in-memory WordPiece, byte-pair or SentencePiece tokenizer, and feeds
them raw text. Each check is one test function parametrized over the cases
(`CASES`), and reads as the way to do that step with such a model:

1. `apply` with the default targets keeps the base model's outputs;
2. `fit` trains the adapter vectors and a task's head, nothing else;
3. an adapter file loads onto a second build of the base model;
4. Monte Carlo passes differ;
5. `merge` and `merge_adapter` match the adapted model;
6. `generate` runs through the adapters, and sampled generations differ
   (generative tasks only);
7. `.keras` files round trip, in this process and in a fresh one (one
   architecture of each kind, and three text tasks with their
   preprocessor);
8. after a text task's preprocessor has run on raw text, adapter files
   (and PEFT's, where its tables map the targets) and `.keras` files round
   trip, with the tokenizer's vocabulary, and `merge` and `merge_adapter`
   match the adapted model; on one task of each kind (BERT, Gemma, T5),
   `fit`, `predict_with_uncertainty` and the merged task's `predict` take
   the raw text.

Not applicable: generation for models without `generate` (classifiers and
backbones); `predict_with_uncertainty` for SAM's backbone, one of whose
outputs has no batch axis (sampled `predict` calls instead); a preprocessor
for backbones without a task (ELECTRA, Whisper), vision models and
PaliGemma (image and text).
"""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from hub_architectures import CASE_BY_NAME
from hub_architectures import CASES
from hub_architectures import FALLBACK_WARNING
from hub_architectures import GENERATIVE
from hub_architectures import IMAGE
from hub_architectures import LENGTH
from hub_architectures import TEXTS
from hub_architectures import VOCABULARY
from hub_architectures import adapt
from hub_architectures import assert_different_outputs
from hub_architectures import assert_same_outputs
from hub_architectures import head_weights
from hub_architectures import image_inputs
from hub_architectures import linear_layer_count
from hub_architectures import network_inputs
from hub_architectures import numpy_outputs
from hub_architectures import randomize
from hub_architectures import raw_text
from hub_architectures import target_names
from hub_architectures import tokenized
from hub_architectures import vectors

import keras_pvera
from keras_pvera.src.surgery.layer_selection import adaptable_layers

keras_hub = pytest.importorskip("keras_hub")
models = keras_hub.models

# Minutes on JAX: outside the fast tier (`-m "not slow"`); CI runs it.
pytestmark = [pytest.mark.slow, pytest.mark.architecture_matrix]

# 1. Right after `apply`, the adapted model computes the base model's outputs.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_default_targets_keep_the_base_outputs(case):
    base = case.build()
    x = case.inputs(4, 0)
    expected = base.predict(x, verbose=0)
    total = linear_layer_count(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras_pvera.apply(base, rank=4)  # target=None: the defaults
    notes = [str(w.message) for w in caught if FALLBACK_WARNING in str(w.message)]
    assert len(notes) == int(case.fallback), notes
    assert target_names(model) == case.targets
    assert len(model.adapted_layers) == case.adapted
    assert 0 < case.adapted < total
    # lambda_b starts at 0 and sampling is off at inference.
    assert_same_outputs(model.predict(x, verbose=0), expected)


# 2. `fit` trains the adapter vectors and a task's head, nothing else.


def training_data(case, model, x):
    """Labels and a loss for a short honest fine-tune of this kind of model."""
    task = model.base_model
    rows = len(keras.tree.flatten(x)[0])
    next_tokens = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if isinstance(task, (models.TextClassifier, models.ImageClassifier)):
        return np.arange(rows) % 2, next_tokens
    if isinstance(task, models.Seq2SeqLM):
        return np.roll(x["decoder_token_ids"], -1, axis=1), next_tokens
    if isinstance(task, models.CausalLM):
        return np.roll(x["token_ids"], -1, axis=1), next_tokens
    # A backbone: regress one of its outputs onto random targets.
    outputs = numpy_outputs(model.predict(x, verbose=0))
    key = case.output or "output"
    rng = np.random.default_rng(7)
    target = rng.normal(size=outputs[key].shape).astype("float32")
    if case.output is None:
        return target, "mse"
    return {key: target}, {key: "mse"}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fit_trains_only_the_vectors_and_the_head(case):
    model = adapt(case)
    x = case.inputs(4, 0)
    y, loss = training_data(case, model, x)
    trained = vectors(model) + head_weights(model)
    assert {id(w) for w in model.trainable_weights} == {id(w) for w in trained}
    if isinstance(model.base_model, (models.TextClassifier, models.ImageClassifier)):
        assert model.trainable_paths  # the classifier head trains in full
    before = {id(w): keras.ops.convert_to_numpy(w).copy() for w in model.weights}

    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)

    def changed(weight):
        return not np.array_equal(
            keras.ops.convert_to_numpy(weight), before[id(weight)]
        )

    # Every adapted layer learns (in BART's first encoder layers the query's
    # lambda_d gradient is below float32 resolution after two steps, so
    # each layer's pair of vectors is checked), and the head trains.
    for path, layer in model.adapted_layers.items():
        assert changed(layer.lambda_b) or changed(layer.lambda_d), path
    assert any(changed(layer.lambda_d) for layer in model.adapted_layers.values())
    for weight in head_weights(model):
        assert changed(weight), weight.path
    trained_ids = {id(w) for w in trained}
    for weight in model.weights:
        if id(weight) not in trained_ids:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(weight),
                before[id(weight)],
                err_msg=weight.path,
            )


# 3. An adapter file loads onto a second base model built in the same process.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adapter_file_loads_onto_a_second_build(case, tmp_path):
    first = case.build()
    model = randomize(adapt(case, first))
    x = case.inputs(4, 1)
    expected = model.predict(x, verbose=0)
    path = tmp_path / f"{case.name}.safetensors"
    keras_pvera.save_adapter(model, path)

    second = case.build()  # Keras names it `<name>_1`
    assert second.name != first.name
    base_outputs = second.predict(x, verbose=0)
    loaded = keras_pvera.load_adapter(second, path)
    assert len(loaded.adapted_layers) == case.adapted
    assert_different_outputs(base_outputs, expected)
    assert_same_outputs(loaded.predict(x, verbose=0), expected)


# 4. Monte Carlo passes differ once the vectors are trained (here: random).


@pytest.mark.parametrize("case", CASES, ids=str)
def test_monte_carlo_passes_differ(case):
    model = randomize(adapt(case), scale=0.5)
    x = case.inputs(2, 2)
    deterministic = model.predict(x, verbose=0)
    if case.batched_outputs:
        result = keras_pvera.predict_with_uncertainty(
            model, x, n=3, seed=0, return_samples=True, verbose=0
        )
        samples, mean = numpy_outputs(result.samples), numpy_outputs(result.mean)
    else:
        # An output without a batch axis has no sample per example: sampled
        # `predict` calls give the passes instead.
        with pytest.raises(ValueError, match="batch on its first axis"):
            keras_pvera.predict_with_uncertainty(model, x, n=3, verbose=0)
        model.sample_at_inference = True
        passes = [numpy_outputs(model.predict(x, verbose=0)) for _ in range(3)]
        model.sample_at_inference = False
        samples = {k: np.stack([p[k] for p in passes]) for k in passes[0]}
        mean = {k: v.mean(axis=0) for k, v in samples.items()}
    key = case.output or "output"
    assert samples[key].shape[0] == 3
    assert not np.allclose(samples[key][0], samples[key][1])
    assert not np.allclose(samples[key][1], samples[key][2])
    assert np.all(np.isfinite(mean[key]))
    # Sampling is off again afterwards.
    assert_same_outputs(model.predict(x, verbose=0), deterministic)


# 5. Merging folds the mean adapter into the kernels.

# Bound on max |merged - adapted| / (1 + max |adapted|), float32, random
# vectors of unit scale. Measured over these cases: 0 on torch and
# TensorFlow (with sampling off the adapted layer also runs its folded
# kernel), at most 1.0e-6 on JAX (CLIP's scaled logits; XLA fuses the two
# graphs differently).
MERGE_TOLERANCE = 1e-5


def relative_error(actual, expected):
    return np.max(np.abs(actual - expected)) / (1 + np.max(np.abs(expected)))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_merge_matches_the_adapted_model(case):
    model = randomize(adapt(case))
    x = case.inputs(4, 3)
    expected = numpy_outputs(model.predict(x, verbose=0))
    with model.disable_adapter():
        base_outputs = numpy_outputs(model.predict(x, verbose=0))

    merged = keras_pvera.merge(model)  # a plain model of the base's class
    assert type(merged) is type(model.base_model)
    assert not any(
        isinstance(layer, keras_pvera.PVeRADense)
        for _, layer in adaptable_layers(merged)
    )
    model.merge_adapter()  # in place
    in_place = numpy_outputs(model.predict(x, verbose=0))
    model.unmerge_adapter()
    for outputs in (numpy_outputs(merged.predict(x, verbose=0)), in_place):
        for key, value in expected.items():
            error = relative_error(outputs[key], value)
            assert error <= MERGE_TOLERANCE, (key, error)
    assert_different_outputs(expected, base_outputs)


# 6. Generation runs through the adapters; sampled generations differ.


PROMPT_LENGTH = 6  # 3 prompt tokens, 3 generated


def prompt(case, rows=4):
    """Token-id inputs of `generate` for a task without a preprocessor."""
    rng = np.random.default_rng(5)
    length = PROMPT_LENGTH
    if case.kind == "encoder-decoder":
        decoder_ids = np.zeros((rows, length), "int32")
        decoder_ids[:, 0] = 1  # a start token; the rest is generated
        return {
            "encoder_token_ids": rng.integers(2, VOCABULARY, (rows, length)).astype(
                "int32"
            ),
            "encoder_padding_mask": np.ones((rows, length), bool),
            "decoder_token_ids": decoder_ids,
            "decoder_padding_mask": decoder_ids > 0,
        }
    token_ids = np.zeros((rows, length), "int32")
    token_ids[:, :3] = rng.integers(2, VOCABULARY, (rows, 3))
    inputs = {"token_ids": token_ids, "padding_mask": token_ids > 0}
    if case.name == "pali_gemma":
        inputs["images"] = image_inputs()(rows, 5)
    if case.name == "gemma3":
        # Gemma 3's generate returns the `images` it gets, and KerasHub fails
        # on `None`: a text-only prompt carries zero images per row, as
        # Gemma3CausalLMPreprocessor's output does.
        inputs["images"] = np.zeros((rows, 0, IMAGE, IMAGE, 3), "float32")
    return inputs


def generated(outputs):
    key = "decoder_token_ids" if "decoder_token_ids" in outputs else "token_ids"
    return outputs[key]


@pytest.mark.parametrize("case", GENERATIVE, ids=str)
def test_generate_through_the_adapters(case):
    task = case.build()
    task.compile(sampler="greedy")  # only PVeRA's noise varies
    p = prompt(case)
    base = generated(task.generate(p, stop_token_ids=None))
    model = adapt(case, task)
    np.testing.assert_array_equal(
        generated(model.generate(p, stop_token_ids=None)), base
    )

    rng = np.random.default_rng(3)
    for layer in model.adapted_layers.values():
        # Large, finite noise: each draw moves the logits by a lot.
        layer.lambda_b.assign(
            5 * rng.normal(size=layer.lambda_b.shape).astype("float32")
        )
        layer.lambda_d.assign(np.full(layer.lambda_d.shape, 1.5, "float32"))
    mean = generated(model.generate(p, stop_token_ids=None))
    assert not np.array_equal(mean, base)
    np.testing.assert_array_equal(
        generated(model.generate(p, stop_token_ids=None)), mean
    )

    model.sample_at_inference = True
    first, second = (generated(model.generate(p, stop_token_ids=None)) for _ in "12")
    assert not np.array_equal(first, second)
    model.sample_at_inference = False


# 7. `.keras` files: one architecture of each kind, in this process and in a
# fresh one.

SAVED = ["bert", "gpt2", "bart", "vit"]


@pytest.mark.parametrize("name", SAVED)
def test_keras_file_round_trip(name, tmp_path):
    case = CASE_BY_NAME[name]
    model = randomize(adapt(case))
    x = case.inputs(4, 4)
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert len(loaded.adapted_layers) == case.adapted
    assert type(loaded.base_model) is type(model.base_model)
    assert_same_outputs(loaded.predict(x, verbose=0), expected)
    if case.generative:
        loaded.base_model.compile(sampler="greedy")
        model.base_model.compile(sampler="greedy")
        p = prompt(case)
        np.testing.assert_array_equal(
            generated(loaded.generate(p, stop_token_ids=None)),
            generated(model.generate(p, stop_token_ids=None)),
        )


# The torch run only: a fresh process finding the adapted layers from the
# saved configuration does not depend on the backend; the same-process round
# trips of these architectures (`test_keras_file_round_trip`) and
# tests/hub/test_keras_hub.py's fresh-process load run on every backend.
@pytest.mark.slow
@pytest.mark.default_backend_only
def test_keras_files_load_in_a_fresh_process(tmp_path):
    """A fresh process rebuilds each base from its saved configuration and
    finds the adapted layers again (by name, else by address); text tasks
    saved after their preprocessor ran (`_text`) get their tokenizer back."""
    saved = ["gpt2", "bart", "vit", "bert_text", "gemma_text", "bart_text"]
    for key in saved:
        name = key.removesuffix("_text")
        case = CASE_BY_NAME[name]
        if key.endswith("_text"):
            model = randomize(adapt(case, case.build(preprocessor=True)))
            x = network_inputs(model, raw_text(case)[0])
            x = {k: keras.ops.convert_to_numpy(v) for k, v in x.items()}
            expected = keras.ops.convert_to_numpy(model(x))
            (tmp_path / f"{key}_tokenized.json").write_text(
                json.dumps(tokenized(model))
            )
        else:
            model = randomize(adapt(case))
            x = case.inputs(4, 4)
            expected = model.predict(x, verbose=0)
        model.save(str(tmp_path / f"{key}.keras"))
        np.savez(
            tmp_path / f"{key}_inputs.npz", **x if isinstance(x, dict) else {"": x}
        )
        np.save(tmp_path / f"{key}_expected.npy", expected)
    script = f"""
import json, numpy as np, keras, keras_pvera
for key in {saved!r}:
    model = keras.models.load_model(f"{tmp_path}/{{key}}.keras")
    inputs = dict(np.load(f"{tmp_path}/{{key}}_inputs.npz"))
    inputs = inputs.get("", inputs)  # an array saved under ""
    expected = np.load(f"{tmp_path}/{{key}}_expected.npy")
    if key.endswith("_text"):
        outputs = keras.ops.convert_to_numpy(model(inputs))
        tokenizer = model.preprocessor.tokenizer
        ids = [keras.ops.convert_to_numpy(tokenizer(t)).tolist() for t in {TEXTS!r}]
        with open(f"{tmp_path}/{{key}}_tokenized.json") as file:
            same = ids == json.load(file)
    else:
        outputs, same = model.predict(inputs, verbose=0), True
    print(key, len(model.adapted_layers), np.abs(outputs - expected).max(), same)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    for key in saved:
        adapted, error, same_tokens = lines[key]
        assert int(adapted) == CASE_BY_NAME[key.removesuffix("_text")].adapted
        assert float(error) <= 1e-6, (key, error)
        assert same_tokens == "True", key


# 8. Text tasks with their preprocessor, after it has run on raw text:
# adapter files, `.keras` files, `merge` and `merge_adapter`; and on one task
# of each kind, `fit`, `predict_with_uncertainty` and the merged task's
# `predict` on raw text.

TEXT_TASKS = [case for case in CASES if case.text]
# KerasHub preprocesses raw text in a tf.data pipeline that it traces on
# every call (a second or more; over ten with a byte-pair tokenizer), so the
# other text tasks call their preprocessor directly instead, which builds it
# just as a first `fit` or `predict` does.
RAW_TEXT_WORKFLOW = {"bert", "gemma", "t5"}  # a classifier, a causal LM, a seq2seq LM
# The text tasks whose default targets PEFT's module-name tables map
# (`keras_pvera.src.peft.architectures.SPECS`), so their adapters save as PEFT
# files. GPT-2 has a table, but its `query` and `value` come out of one
# fused torch module, `c_attn`.
PEFT_FILES = set(
    "bert roberta distil_bert albert llama3 mixtral gemma gemma3 qwen3 bart".split()
)


@pytest.mark.parametrize("case", TEXT_TASKS, ids=str)
def test_text_task_with_its_preprocessor(case, tmp_path):
    """A preprocessor builds its packer when it first runs, so the adapted
    task then holds a sublayer that the task rebuilt from its configuration
    (by `merge`, or when a file is loaded) does not have yet; and its
    tokenizer's vocabulary is an asset, not a weight."""
    model = adapt(case, case.build(preprocessor=True))
    x, y = raw_text(case)
    raw = case.name in RAW_TEXT_WORKFLOW
    if raw:
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
        # lambda_b starts at 0, so the first step moves it (not lambda_d).
        for path, layer in model.adapted_layers.items():
            assert np.any(keras.ops.convert_to_numpy(layer.lambda_b) != 0), path
    tokens = network_inputs(model, x)
    randomize(model, scale=0.5)
    expected = numpy_outputs(model(tokens))
    if raw:
        result = keras_pvera.predict_with_uncertainty(
            model, x, n=3, seed=0, return_samples=True, verbose=0
        )
        samples = numpy_outputs(result.samples)["output"]
        assert samples.shape == (3,) + expected["output"].shape
        assert not np.allclose(samples[0], samples[1])
        assert np.all(np.isfinite(numpy_outputs(result.mean)["output"]))

    # Adapter files, onto a second build whose preprocessor has run.
    path = tmp_path / "adapter.safetensors"
    keras_pvera.save_adapter(model, path)
    second = case.build(preprocessor=True)
    network_inputs(second, x)
    loaded = keras_pvera.load_adapter(second, path)
    assert_same_outputs(loaded(tokens), expected)
    if case.name in PEFT_FILES:
        keras_pvera.save_peft_adapter(model, tmp_path / "peft")
        third = case.build(preprocessor=True)
        network_inputs(third, x)
        loaded = keras_pvera.load_peft_adapter(third, tmp_path / "peft")
        assert_same_outputs(loaded(tokens), expected)

    # The tokenizers rebuilt from a file and by `merge` have the vocabulary.
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert tokenized(loaded) == tokenized(model)
    assert_same_outputs(loaded(tokens), expected)

    merged = keras_pvera.merge(model)
    assert tokenized(merged) == tokenized(model)
    model.merge_adapter()
    in_place = numpy_outputs(model(tokens))
    model.unmerge_adapter()
    outputs = [numpy_outputs(merged(tokens)), in_place]
    if raw:
        if case.kind == "encoder-decoder":
            # KerasHub's Seq2SeqLMPreprocessor leaves its sequence lengths
            # out of its configuration (keras-hub 0.32): rebuilt, it has
            # the default 1024.
            merged.preprocessor.encoder_sequence_length = LENGTH
            merged.preprocessor.decoder_sequence_length = LENGTH
        # The merged task's own preprocessor, on raw text.
        outputs.append(numpy_outputs(merged.predict(x, verbose=0)))
    for output in outputs:
        error = relative_error(output["output"], expected["output"])
        assert error <= MERGE_TOLERANCE, error
