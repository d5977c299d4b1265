"""save_lora_adapter: an adapter's mean written as a PEFT LoRA folder.

These tests read the folder with safetensors only (no PEFT): its factors
multiply to each layer's mean delta, and what cannot be a LoRA is refused.
PEFT itself loads the folders in tests/peft/test_peft_architectures.py
(every architecture) and tests/peft/test_peft_interop.py (GPT-2's fused
`c_attn`).
"""

import json

import keras
import numpy as np
import pytest
import safetensors.numpy
from builders import peft_bert as keras_bert
from builders import randomize_vectors

import keras_pvera
from keras_pvera.src.peft.architectures import BERT
from keras_pvera.src.peft.module_names import kernel_matrix

keras_hub = pytest.importorskip("keras_hub")


def read_folder(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = safetensors.numpy.load_file(str(folder / "adapter_model.safetensors"))
    return config, tensors


def mean_delta(layer):
    """A layer's mean delta as the `(in, out)` matrix of its linear map."""
    return kernel_matrix(
        keras.ops.convert_to_numpy(layer.delta_kernel()),
        "heads",
        getattr(layer.base_layer, "equation", None),
    )


def test_lora_factors_multiply_to_each_layer_mean_delta(tmp_path):
    model = randomize_vectors(
        keras_pvera.apply(keras_bert(), rank=4, alpha=3.0, target="all"), scale=1.0
    )
    keras_pvera.save_lora_adapter(model, tmp_path)
    config, tensors = read_folder(tmp_path)

    assert config["peft_type"] == "LORA"
    assert config["r"] == config["lora_alpha"] == 4  # PEFT's scaling: 1
    assert len(config["target_modules"]) == len(model.adapted_layers)
    assert len(tensors) == 2 * len(model.adapted_layers)
    for path, layer in model.adapted_layers.items():
        key = f"base_model.model.{BERT.hf_module(path, 'transformers5')}."
        lora_a, lora_b = tensors[key + "lora_A.weight"], tensors[key + "lora_B.weight"]
        assert lora_a.shape == (4, layer.in_dim)
        assert lora_b.shape == (layer.out_dim, 4)
        # PyTorch's (out, in) layout: the delta is lora_B @ lora_A.
        np.testing.assert_allclose(
            (lora_b @ lora_a).T, mean_delta(layer), rtol=1e-5, atol=1e-6
        )


def test_an_adapter_is_picked_by_name_the_active_one_by_default(tmp_path):
    model = randomize_vectors(
        keras_pvera.apply(keras_bert(), rank=4, target=["query"]), scale=1.0
    )
    model.add_adapter("other", rank=4, target=["query"])
    model.set_adapter("other")
    randomize_vectors(model, seed=1, scale=1.0)
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
    written = {}
    for name in ("default", "other"):
        keras_pvera.save_lora_adapter(model, tmp_path / name, adapter=name)
        written[name] = read_folder(tmp_path / name)[1][key]
    keras_pvera.save_lora_adapter(model, tmp_path / "active")
    np.testing.assert_array_equal(
        read_folder(tmp_path / "active")[1][key], written["other"]
    )
    assert np.abs(written["other"] - written["default"]).max() > 1e-2


def test_sampling_at_inference_writes_the_mean(tmp_path):
    model = randomize_vectors(
        keras_pvera.apply(keras_bert(), rank=4, target=["value"]), scale=1.0
    )
    keras_pvera.save_lora_adapter(model, tmp_path / "mean")
    model.sample_at_inference = True
    keras_pvera.save_lora_adapter(model, tmp_path / "sampling")
    mean, sampling = (
        read_folder(tmp_path / "mean")[1],
        read_folder(tmp_path / "sampling")[1],
    )
    for key, array in mean.items():
        np.testing.assert_array_equal(sampling[key], array)


def test_what_a_lora_folder_cannot_hold_is_refused(tmp_path):
    with pytest.raises(TypeError, match="PVeRAModel"):
        keras_pvera.save_lora_adapter(keras_bert(), tmp_path / "out")
    embedding = keras_pvera.apply(keras_bert(), rank=4, target=["token_embedding"])
    with pytest.raises(ValueError, match="'token_embedding' has no Hugging Face"):
        keras_pvera.save_lora_adapter(embedding, tmp_path / "out")
    with_head = keras_pvera.apply(
        keras_bert(), rank=4, target=["query"], trainable_layers=["pooled_dense"]
    )
    with pytest.raises(ValueError, match="trained in full"):
        keras_pvera.save_lora_adapter(with_head, tmp_path / "out")
    gpt2 = keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    part = keras_pvera.apply(gpt2, rank=2, target=["query", "value"])
    with pytest.raises(ValueError, match="fused group"):
        keras_pvera.save_lora_adapter(part, tmp_path / "out")
    assert not (tmp_path / "out").exists()
