"""A KerasHub task exports: adapted, with `model.export`, wherever the task
itself exports; merged, to Hugging Face Transformers.

`keras_pvera.merge` gives back the task's own classes with the adapters
folded into the kernels, so KerasHub's `export_to_transformers` writes it
as it writes the base task: the Transformers model loaded from that folder
computes the adapted model's logits. One tiny causal LM (random weights,
an in-memory tokenizer, the preprocessor attached as `from_preset` gives
it) per architecture KerasHub 0.32 exports and this file builds: GPT-2,
Llama 3, Mistral, Qwen (2) and Gemma. Not built here: Gemma 3 and 4 and
Qwen 3.5, whose exporters also write vision or hybrid-attention configs.
"""

import keras
import numpy as np
import pytest

import keras_pvera

keras_hub = pytest.importorskip("keras_hub")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# The tiny builders and in-memory tokenizers of the architecture matrix.
import hub_architectures as architectures  # noqa: E402

models = keras_hub.models
pytestmark = [pytest.mark.slow, pytest.mark.architecture_matrix]


@architectures.seeded
def mistral(preprocessor=False):
    backbone = models.MistralBackbone(
        **architectures.DECODER, sliding_window=architectures.LENGTH
    )
    return architectures.text_task(models.MistralCausalLM, backbone, preprocessor)


@architectures.seeded
def qwen(preprocessor=False):
    backbone = models.QwenBackbone(**architectures.DECODER)
    return architectures.text_task(models.QwenCausalLM, backbone, preprocessor)


BUILDERS = {
    "gpt2": architectures.gpt2,
    "llama3": architectures.llama3,
    "mistral": mistral,
    "qwen": qwen,
    "gemma": architectures.gemma,
}


def logits_of(task, inputs):
    return keras.ops.convert_to_numpy(task(inputs))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_merged_causal_lm_exports_to_transformers(name, tmp_path):
    task = BUILDERS[name](preprocessor=True)
    model = keras_pvera.apply(task, rank=4, target="all")
    rng = np.random.default_rng(0)
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(rng.normal(size=layer.out_dim).astype("float32"))
    inputs = architectures.network_inputs(task, architectures.TEXTS)
    base_logits = logits_of(BUILDERS[name](), inputs)
    adapted_logits = logits_of(model, inputs)
    assert np.max(np.abs(adapted_logits - base_logits)) > 1e-2  # The adapter acts.
    with pytest.raises(ValueError, match=r"keras_pvera.merge\(model\)"):
        model.export_to_transformers(str(tmp_path / "adapted"))

    merged = keras_pvera.merge(model)
    assert type(merged) is type(task) and type(merged.backbone) is type(task.backbone)
    merged.export_to_transformers(str(tmp_path / "merged"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    hf_model.eval()
    with torch.no_grad():
        hf_logits = hf_model(
            input_ids=torch.tensor(np.asarray(inputs["token_ids"]), dtype=torch.long),
            attention_mask=torch.tensor(
                np.asarray(inputs["padding_mask"]), dtype=torch.long
            ),
        ).logits.numpy()
    # Padded positions differ by design (KerasHub masks them its own way).
    real = np.asarray(inputs["padding_mask"]).astype(bool)
    np.testing.assert_allclose(hf_logits[real], adapted_logits[real], atol=1e-4)
    # The exported tokenizer loads beside the model.
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged") is not None


def exported_outputs(model, x, path):
    """`model.export`ed with token inputs of length `LENGTH`, then run:
    ONNX Runtime on torch (whose ONNX export of a KerasHub task needs
    every dimension fixed, the batch too), a SavedModel elsewhere."""
    batch = len(x["token_ids"]) if keras.backend.backend() == "torch" else None
    signature = [
        {
            name: keras.InputSpec(shape=(batch, architectures.LENGTH), dtype="int32")
            for name in x
        }
    ]
    if keras.backend.backend() == "torch":
        import onnxruntime

        model.export(f"{path}.onnx", format="onnx", input_signature=signature)
        session = onnxruntime.InferenceSession(f"{path}.onnx")
        names = [spec.name for spec in session.get_inputs()]
        return session.run(None, dict(zip(names, keras.tree.flatten(x), strict=True)))[
            0
        ]
    import tensorflow as tf

    model.export(path, input_signature=signature, verbose=False)
    loaded = tf.saved_model.load(path)  # Held: its variables live with it.
    return loaded.serve(x).numpy()


def test_an_adapted_text_classifier_exports_where_the_task_does(tmp_path):
    task = architectures.bert()  # Token inputs: no preprocessor in the graph.
    x = architectures.token_inputs("padding_mask", "segment_ids")(3, 0)
    base_logits = logits_of(task, x)
    np.testing.assert_allclose(
        exported_outputs(task, x, str(tmp_path / "task")), base_logits, atol=1e-4
    )
    model = keras_pvera.apply(task, rank=4)
    architectures.randomize(model)
    adapted_logits = model.predict(x, verbose=0)
    assert np.max(np.abs(adapted_logits - base_logits)) > 1e-2  # The adapter acts.
    np.testing.assert_allclose(
        exported_outputs(model, x, str(tmp_path / "adapted")), adapted_logits, atol=1e-4
    )


def test_an_adapted_text_classifier_serves_its_uncertainty(tmp_path):
    model = keras_pvera.apply(architectures.bert(), rank=4, d_initial=1.0)
    architectures.randomize(model)
    x = architectures.token_inputs("padding_mask", "segment_ids")(3, 0)
    signature = [
        {
            name: keras.InputSpec(shape=(None, architectures.LENGTH), dtype="int32")
            for name in x
        }
    ]
    path, n, seed = str(tmp_path / "served"), 4, 1
    if keras.backend.backend() == "torch":  # Torch's exporters cannot sample.
        with pytest.raises(ValueError, match="TensorFlow and JAX"):
            keras_pvera.export_with_uncertainty(model, path, n=n, seed=seed)
        return
    import tensorflow as tf

    keras_pvera.export_with_uncertainty(
        model, path, n=n, seed=seed, input_signature=signature, verbose=False
    )
    loaded = tf.saved_model.load(path)
    served = loaded.serve_uncertainty(x)
    expected = keras_pvera.predict_with_uncertainty(
        model, x, n=n, seed=seed, batch_size=n * 3, verbose=0
    )
    assert np.min(expected.std) > 1e-5  # The passes differ.
    for name in ("mean", "std", "lower", "upper"):
        np.testing.assert_allclose(
            served[name].numpy(), getattr(expected, name), rtol=0, atol=1e-4
        )
