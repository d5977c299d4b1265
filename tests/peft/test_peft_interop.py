"""PEFT PVeRA adapters: load_peft_adapter / save_peft_adapter.

The equivalence tests build tiny random-weight Hugging Face BERT and DINOv2
models in a temporary folder (nothing is downloaded), attach PEFT PVeRA
adapters with non-zero vectors, and compare PEFT's eval outputs with the
Keras mean outputs of the KerasHub models converted from the same folder.
The other tests write PEFT-format folders by hand and need no PEFT. The
tests that run PEFT (torch, transformers and peft beside the backend) are
marked slow.
"""

import json
import sys

import keras
import numpy as np
import pytest
import safetensors.numpy
from builders import peft_bert as keras_bert

import keras_pvera
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.peft.architectures import ALBERT
from keras_pvera.src.peft.architectures import BERT
from keras_pvera.src.peft.architectures import DINOV2
from keras_pvera.src.peft.architectures import GPT2
from keras_pvera.src.peft.architectures import LLAMA3
from keras_pvera.src.peft.architectures import MIXTRAL
from keras_pvera.src.peft.architectures import VIT
from keras_pvera.src.peft.peft_config import NOT_IN_PEFT
from keras_pvera.src.peft.peft_config import PVERA_FIELDS
from keras_pvera.src.peft.peft_config import pvera_fields
from keras_pvera.src.peft.peft_config import read_peft_config
from keras_pvera.src.peft.peft_config import settings_without_peft_rule
from keras_pvera.src.surgery.layer_walk import iter_layers

keras_hub = pytest.importorskip("keras_hub")

TOLERANCE = 1e-4
HIDDEN, HEADS, LAYERS, INTERMEDIATE = 32, 4, 2, 64


def write_peft_folder(folder, tensors, **config):
    """Writes a PEFT PVeRA adapter folder by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    full = {"peft_type": "PVERA", "r": 4, "save_projection": True, **config}
    (folder / "adapter_config.json").write_text(json.dumps(full))
    safetensors.numpy.save_file(
        tensors,
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    return folder


def bert_query_value_tensors(rank=4, projections=True, seed=0):
    """PEFT tensors adapting query and value of every tiny BERT block."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(LAYERS):
        for name in ("query", "value"):
            key = f"base_model.model.encoder.layer.{i}.attention.self.{name}"
            tensors[key + ".pvera_lambda_d"] = rng.normal(size=2 * rank).astype(
                "float32"
            )
            tensors[key + ".pvera_lambda_b"] = rng.normal(size=HIDDEN).astype("float32")
    if projections:
        tensors["base_model.pvera_A"] = rng.uniform(-1, 1, (2 * rank, HIDDEN)).astype(
            "float32"
        )
        tensors["base_model.pvera_B"] = rng.uniform(-1, 1, (HIDDEN, rank)).astype(
            "float32"
        )
    return tensors


def numpy_weights(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.weights]


def assert_untouched(model, before):
    assert not any(isinstance(layer, PVeRADense) for _, layer in iter_layers(model))
    after = numpy_weights(model)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)


# The module-name tables.


def test_tables_map_both_ways():
    assert (
        BERT.keras_path("encoder.layer.1.attention.self.query")
        == "transformer_layer_1/self_attention_layer/query"
    )
    assert (
        BERT.keras_path("bert.encoder.layer.0.intermediate.dense")
        == "transformer_layer_0/feedforward_intermediate_dense"
    )
    assert BERT.keras_path("classifier") is None
    for naming in ("transformers5", "legacy"):
        for entry in DINOV2.linear:
            module = entry.hf_name(naming).format(i=3)
            path = entry.keras.format(i=3)
            assert DINOV2.keras_path(module) == path
            assert DINOV2.keras_path("dinov2." + module) == path
            assert DINOV2.hf_module(path, naming) == module
    assert (
        DINOV2.keras_path("encoder.layer.2.attention.q_proj")
        == DINOV2.keras_path("encoder.layer.2.attention.attention.query")
        == "encoder/layers_2/attention/attention/query"
    )
    assert (
        DINOV2.hf_module(
            "encoder/layers_0/attention/attention/attention_output",
            "legacy",
            "dinov2.",
        )
        == "dinov2.encoder.layer.0.attention.output.dense"
    )


def test_block_offsets_and_refusals():
    # KerasHub numbers ViT blocks from 1, transformers from 0.
    assert VIT.keras_path("vit.layers.0.mlp.fc1") == (
        "vit_encoder/transformer_block_1/mlp/dense_1"
    )
    assert VIT.keras_path("vit.encoder.layer.4.attention.attention.value") == (
        "vit_encoder/transformer_block_5/mha/value"
    )
    assert VIT.hf_module("vit_encoder/transformer_block_3/mha/key", "legacy") == (
        "encoder.layer.2.attention.attention.key"
    )
    assert VIT.keras_path("vit.layers.x.mlp.fc1") is None
    # GPT-2's fused c_attn is KerasHub's query, key and value: a fused group.
    assert GPT2.find("transformer.h.3.attn.c_attn") == (None, None)
    assert GPT2.find_fused("transformer.h.3.attn.c_attn") == tuple(
        f"transformer_layer_3/self_attention/{part}"
        for part in ("query", "key", "value")
    )
    assert GPT2.hf_fused_module(GPT2.find_fused("h.1.attn.c_attn"), "transformer.") == (
        "transformer.h.1.attn.c_attn"
    )
    assert GPT2.hf_fused_module(GPT2.find_fused("h.1.attn.c_attn")[::-1]) is None
    assert GPT2.find("h.0.attn.c_proj") == (
        "transformer_layer_0/self_attention/attention_output",
        None,
    )
    assert "ReversibleEmbedding" in LLAMA3.find("lm_head")[1]
    assert "batched" in MIXTRAL.find("model.layers.1.mlp.experts")[1]
    assert MIXTRAL.find("model.layers.1.mlp.gate_proj") == (None, None)
    assert ALBERT.keras_path(
        "albert.encoder.albert_layer_groups.0.albert_layers.1.ffn_output"
    ) == ("group_0_inner_layer_1/feedforward_output_dense")


@pytest.mark.slow
def test_query_layout_matches_torch_linear(tmp_path):
    """PEFT's (out, in) delta lands in KerasHub's (hidden, heads, head_dim)."""
    rank = 4
    tensors = bert_query_value_tensors(rank)
    folder = write_peft_folder(tmp_path / "adapter", tensors, r=rank)
    model = keras_pvera.load_peft_adapter(keras_bert(), folder)

    key = "base_model.model.encoder.layer.1.attention.self.query"
    a = tensors["base_model.pvera_A"][:rank]
    b = tensors["base_model.pvera_B"]
    lambda_d = tensors[key + ".pvera_lambda_d"][:rank]
    lambda_b = tensors[key + ".pvera_lambda_b"]
    # torch.nn.Linear layout, as PEFT's get_delta_weight computes it.
    delta_out_in = (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
    # KerasHub's converter: transpose, then reshape to the kernel's shape.
    expected = delta_out_in.T.reshape(HIDDEN, HEADS, HIDDEN // HEADS)

    layer = model.adapted_layers["transformer_layer_1/self_attention_layer/query"]
    actual = keras.ops.convert_to_numpy(layer.delta_kernel())
    assert actual.shape == (HIDDEN, HEADS, HIDDEN // HEADS)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


# Errors, each leaving the model unchanged.


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda t, c: c.update(peft_type="LORA"),
            ValueError,
            "peft_type='LORA'",
        ),
        (lambda t, c: c.update(bias="all"), ValueError, "bias='all'"),
        # PVeRAConfig checks the values; the message names PEFT's field.
        (
            lambda t, c: c.update(r=0),
            ValueError,
            r"bad r=0 \(keras_pvera's `rank`\): `rank` must be a positive",
        ),
        (
            lambda t, c: c.update(projection_prng_key=True),
            ValueError,
            r"bad projection_prng_key=True \(keras_pvera's `seed`\)",
        ),
        (
            lambda t, c: c.update(pvera_dropout=1.0),
            ValueError,
            r"bad pvera_dropout=1.0 .*`dropout` must be a number in \[0, 1\)",
        ),
        (lambda t, c: c.update(generator_seed=-1), ValueError, "generator_seed=-1"),
        (lambda t, c: c.update(bias="lora_only"), ValueError, "knows 'none'"),
        (
            lambda t, c: (
                c.update(modules_to_save=["classifier"]),
                t.update(
                    {"base_model.model.classifier.weight": np.ones((2, 32), "float32")}
                ),
            ),
            ValueError,
            r"load only onto a KerasHub task.*BertTextClassifier",
        ),
        (
            lambda t, c: c.update(modules_to_save="classifier"),
            ValueError,
            "bad modules_to_save='classifier'",
        ),
        (
            lambda t, c: t.update(
                {"base_model.model.classifier.weight": np.ones(2, "float32")}
            ),
            ValueError,
            "'base_model.model.classifier.weight', which is not a PVeRA",
        ),
        (
            lambda t, c: t.pop(
                "base_model.model.encoder.layer.0.attention.self.value.pvera_lambda_b"
            ),
            ValueError,
            "missing tensor 'base_model.model.encoder.layer.0.attention.self."
            "value.pvera_lambda_b'",
        ),
        (
            lambda t, c: t.update(
                {
                    "base_model.model.encoder.layer.0.attention.self.value"
                    ".pvera_lambda_b": np.ones(7, "float32")
                }
            ),
            ValueError,
            r"has shape \(7,\)",
        ),
        (
            lambda t, c: t.update(
                {
                    "base_model.model.encoder.layer.0.attention.self.rotary"
                    ".pvera_lambda_b": np.ones(32, "float32"),
                    "base_model.model.encoder.layer.0.attention.self.rotary"
                    ".pvera_lambda_d": np.ones(8, "float32"),
                }
            ),
            ValueError,
            "'encoder.layer.0.attention.self.rotary' has no KerasHub",
        ),
        (
            lambda t, c: t.update(
                {
                    "base_model.model.encoder.layer.5.attention.self.query"
                    ".pvera_lambda_b": np.ones(32, "float32"),
                    "base_model.model.encoder.layer.5.attention.self.query"
                    ".pvera_lambda_d": np.ones(8, "float32"),
                }
            ),
            ValueError,
            "'transformer_layer_5/self_attention_layer/query', which model",
        ),
        (
            lambda t, c: t.pop("base_model.pvera_A"),
            ValueError,
            "no tensor 'base_model.pvera_A'",
        ),
        (
            lambda t, c: t.update({"base_model.pvera_A": np.ones((8, 16), "float32")}),
            ValueError,
            r"'base_model.pvera_A' has shape \(8, 16\)",
        ),
    ],
)
def test_bad_adapters(tmp_path, change, error, message):
    tensors, config = bert_query_value_tensors(), {}
    change(tensors, config)
    folder = write_peft_folder(tmp_path / "adapter", tensors, **config)
    model = keras_bert()
    before = numpy_weights(model)
    with pytest.raises(error, match=message):
        keras_pvera.load_peft_adapter(model, folder)
    assert_untouched(model, before)


def test_every_setting_has_one_peft_rule():
    """Each PVeRAConfig setting is a PEFT field or says what PEFT has instead."""
    assert settings_without_peft_rule() == (), (
        "Add these settings to PVERA_FIELDS or NOT_IN_PEFT "
        "(keras_pvera/src/peft/peft_config.py)"
    )
    fields = [f.setting for f in PVERA_FIELDS if f.setting is not None]
    assert not set(fields) & set(NOT_IN_PEFT)
    assert len(fields) == len(set(fields))


def test_config_fields_read_back_as_written(tmp_path):
    config = keras_pvera.PVeRAConfig(
        rank=4, seed=7, generator_seed=3, d_initial=0.5, dropout=0.25
    ).replace(sample_at_inference=True, save_projection=False)
    write_peft_folder(tmp_path, {}, **pvera_fields(config))
    assert read_peft_config(tmp_path).settings == config
    absent = write_peft_folder(tmp_path / "defaults", {}, r=256, save_projection=True)
    assert read_peft_config(absent).settings == keras_pvera.PVeRAConfig()


def test_truncated_weights_file(tmp_path):
    folder = write_peft_folder(tmp_path / "adapter", bert_query_value_tensors())
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    model = keras_bert()
    before = numpy_weights(model)
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        keras_pvera.load_peft_adapter(model, folder)
    assert_untouched(model, before)


def test_pickle_weights_are_refused(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "PVERA"}')
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FileNotFoundError, match="pickle"):
        keras_pvera.load_peft_adapter(keras_bert(), folder)


def test_architecture_without_a_table(tmp_path):
    folder = write_peft_folder(tmp_path / "adapter", bert_query_value_tensors())
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no module-name table.*BertBackbone"):
        keras_pvera.load_peft_adapter(other, folder)
    adapted_other = keras_pvera.apply(
        keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)]
        ),
        rank=2,
    )
    with pytest.raises(ValueError, match="no module-name table"):
        keras_pvera.save_peft_adapter(adapted_other, tmp_path / "out")


def test_other_projections_are_refused_as_a_second_adapter(tmp_path):
    folder = write_peft_folder(tmp_path / "adapter", bert_query_value_tensors())
    adapted = keras_pvera.apply(keras_bert(), rank=4)
    before = numpy_weights(adapted)
    with pytest.raises(ValueError, match="other projections"):
        keras_pvera.load_peft_adapter(adapted, folder, adapter="peft")
    assert adapted.adapter_names == ["default"]
    for a, b in zip(numpy_weights(adapted), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_named_adapters_load_from_peft_sub_folders(tmp_path):
    # PEFT's save_pretrained writes "default" in the folder and every other
    # adapter in a sub-folder named after it.
    keras.utils.set_random_seed(0)
    model = keras_pvera.apply(keras_bert(), rank=4, seed=3)
    model.add_adapter("other", rank=4, seed=3, d_initial=0.5)
    outputs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        for layer in model.adapted_layers.values():
            layer.lambda_b.assign(
                np.random.default_rng(len(name))
                .normal(size=layer.out_dim)
                .astype("float32")
            )
        outputs[name] = keras_bert_outputs(model)
        folder = tmp_path / "peft" / ("" if name == "default" else name)
        keras_pvera.save_peft_adapter(model, folder, adapter=name)
    assert np.abs(outputs["default"] - outputs["other"]).max() > 1e-2

    keras.utils.set_random_seed(0)
    loaded = keras_pvera.load_peft_adapter(keras_bert(), tmp_path / "peft")
    keras_pvera.load_peft_adapter(loaded, tmp_path / "peft", adapter="other")
    assert loaded.adapter_names == ["default", "other"]
    for name in ("default", "other"):
        loaded.set_adapter(name)
        np.testing.assert_allclose(keras_bert_outputs(loaded), outputs[name], atol=1e-5)


def test_projections_without_torch_are_refused(tmp_path, monkeypatch):
    folder = write_peft_folder(
        tmp_path / "adapter",
        bert_query_value_tensors(projections=False),
        save_projection=False,
        projection_prng_key=3,
    )
    model = keras_bert()
    before = numpy_weights(model)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    with pytest.raises(ImportError, match="torch is not importable"):
        keras_pvera.load_peft_adapter(model, folder)
    assert_untouched(model, before)


def test_save_errors(tmp_path):
    with pytest.raises(TypeError, match="PVeRAModel"):
        keras_pvera.save_peft_adapter(keras_bert(), tmp_path / "out")
    model = keras_pvera.apply(keras_bert(), rank=4)
    with pytest.raises(ValueError, match="`naming` must be one of"):
        keras_pvera.save_peft_adapter(model, tmp_path / "out", naming="v4")
    with pytest.raises(ValueError, match="PEFT regenerates the projections"):
        # keras_pvera's seed-made projections are not torch's.
        keras_pvera.save_peft_adapter(model, tmp_path / "out", save_projection=False)
    with_head = keras_pvera.apply(
        keras_bert(),
        rank=4,
        target=["query"],
        trainable_layers=["pooled_dense"],
    )
    with pytest.raises(ValueError, match="trained in full"):
        keras_pvera.save_peft_adapter(with_head, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_writes_peft_names_and_folds_alpha(tmp_path):
    model = keras_pvera.apply(keras_bert(), rank=4, alpha=3.0, target=["query"])
    layer = model.adapted_layers["transformer_layer_0/self_attention_layer/query"]
    layer.lambda_b.assign(np.full(HIDDEN, 2.0, "float32"))
    keras_pvera.save_peft_adapter(model, tmp_path / "out", module_prefix="bert.")

    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PVERA" and config["r"] == 4
    assert config["target_modules"] == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
    ]
    tensors = safetensors.numpy.load_file(
        str(tmp_path / "out" / "adapter_model.safetensors")
    )
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.pvera_lambda_b"
    np.testing.assert_array_equal(tensors[key], np.full(HIDDEN, 6.0, "float32"))
    assert tensors["base_model.pvera_A"].shape == (8, HIDDEN)


# Equivalence with PEFT itself.


@pytest.fixture(scope="module")
def hf():
    """Tiny random-weight Hugging Face BERT and DINOv2 saved to a temp dir."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft.tuners.pvera")  # not tests/peft
    return torch, transformers


@pytest.fixture(scope="module")
def bert_dir(hf, tmp_path_factory):
    torch, transformers = hf
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=64,
        hidden_act="gelu_pytorch_tanh",  # KerasHub BERT's approximate GELU
    )
    folder = tmp_path_factory.mktemp("hf_bert")
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dinov2_dir(hf, tmp_path_factory):
    torch, transformers = hf
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        mlp_ratio=2,
        image_size=28,
        patch_size=14,
    )
    folder = tmp_path_factory.mktemp("hf_dinov2")
    transformers.Dinov2Model(config).save_pretrained(folder)
    return folder


TOKENS = np.random.default_rng(0).integers(1, 100, (2, 9))
IMAGES = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype("float32")


def peft_bert_outputs(hf, model):
    torch, _ = hf
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(TOKENS),
            attention_mask=torch.ones(TOKENS.shape, dtype=torch.long),
            token_type_ids=torch.zeros(TOKENS.shape, dtype=torch.long),
        )
    return np.concatenate(
        [
            out.last_hidden_state.numpy().ravel(),
            out.pooler_output.numpy().ravel(),
        ]
    )


def keras_bert_outputs(model):
    out = model.predict(
        {
            "token_ids": TOKENS,
            "segment_ids": np.zeros_like(TOKENS),
            "padding_mask": np.ones(TOKENS.shape, bool),
        },
        verbose=0,
    )
    return np.concatenate(
        [out["sequence_output"].ravel(), out["pooled_output"].ravel()]
    )


def peft_dinov2_outputs(hf, model):
    torch, _ = hf
    model.eval()
    with torch.no_grad():
        pixels = torch.tensor(IMAGES.transpose(0, 3, 1, 2))
        return model(pixel_values=pixels).last_hidden_state.numpy().ravel()


def keras_dinov2_outputs(model):
    return model.predict({"images": IMAGES}, verbose=0).ravel()


def peft_model(hf, folder, model_class, **config):
    from peft import PveraConfig
    from peft import get_peft_model

    torch, _ = hf
    torch.manual_seed(1)  # init_weights=False draws lambda_d from torch
    base = model_class.from_pretrained(folder)
    config = PveraConfig(init_weights=False, **config)
    return get_peft_model(base, config)


def peft_load(hf, folder, model_class, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(model_class.from_pretrained(folder), str(adapter))


@pytest.mark.slow
def test_bert_peft_adapter_matches_peft(hf, bert_dir, tmp_path):
    transformers = hf[1]
    peft = peft_model(
        hf,
        bert_dir,
        transformers.BertModel,
        r=8,
        target_modules=["query", "key", "value", "dense"],  # every table entry
        projection_prng_key=4,
    )
    expected = peft_bert_outputs(hf, peft)
    with peft.disable_adapter():
        without = peft_bert_outputs(hf, peft)
    assert np.abs(expected - without).max() > 1e-2
    peft.save_pretrained(tmp_path / "adapter")

    base = keras_hub.models.BertBackbone.from_preset(str(bert_dir))
    np.testing.assert_allclose(keras_bert_outputs(base), without, atol=TOLERANCE)
    model = keras_pvera.load_peft_adapter(base, tmp_path / "adapter")

    assert len(model.adapted_layers) == 6 * LAYERS + 1
    assert model.pvera_config.alpha == 1.0 and model.pvera_config.save_projection
    assert np.abs(keras_bert_outputs(model) - expected).max() <= TOLERANCE


@pytest.mark.slow
def test_bert_keras_adapter_loads_in_peft(hf, bert_dir, tmp_path):
    transformers = hf[1]
    base = keras_hub.models.BertBackbone.from_preset(str(bert_dir))
    model = keras_pvera.apply(base, rank=8, alpha=2.0, seed=5, target="all")
    rng = np.random.default_rng(3)
    for layer in model.adapted_layers.values():
        layer.lambda_d.assign(rng.normal(size=layer.lambda_d.shape).astype("float32"))
        layer.lambda_b.assign(rng.normal(size=layer.lambda_b.shape).astype("float32"))
    expected = keras_bert_outputs(model)

    keras_pvera.save_peft_adapter(model, tmp_path / "adapter")
    peft = peft_load(hf, bert_dir, transformers.BertModel, tmp_path / "adapter")

    assert np.abs(peft_bert_outputs(hf, peft) - expected).max() <= TOLERANCE


@pytest.mark.slow
def test_dinov2_peft_adapter_matches_peft_both_ways(hf, dinov2_dir, tmp_path):
    transformers = hf[1]
    peft = peft_model(
        hf,
        dinov2_dir,
        transformers.Dinov2Model,
        r=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    )
    expected = peft_dinov2_outputs(hf, peft)
    with peft.disable_adapter():
        assert np.abs(expected - peft_dinov2_outputs(hf, peft)).max() > 1e-2
    peft.save_pretrained(tmp_path / "adapter")

    base = keras_hub.models.DINOV2Backbone.from_preset(str(dinov2_dir))
    model = keras_pvera.load_peft_adapter(base, tmp_path / "adapter")
    actual = keras_dinov2_outputs(model)
    assert len(model.adapted_layers) == 6 * LAYERS
    assert np.abs(actual - expected).max() <= TOLERANCE

    # And back: the Keras model's adapter, written for PEFT.
    keras_pvera.save_peft_adapter(model, tmp_path / "back", naming="transformers5")
    back = peft_load(hf, dinov2_dir, transformers.Dinov2Model, tmp_path / "back")
    assert np.abs(peft_dinov2_outputs(hf, back) - actual).max() <= TOLERANCE


@pytest.mark.slow
def test_dinov2_adapter_with_pre_transformers5_names(hf, dinov2_dir, tmp_path):
    """Adapters made with older transformers (the paper's) name modules
    `attention.attention.query/value`."""
    transformers = hf[1]
    peft = peft_model(
        hf,
        dinov2_dir,
        transformers.Dinov2Model,
        r=8,
        target_modules=["q_proj", "v_proj"],
    )
    expected = peft_dinov2_outputs(hf, peft)
    peft.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights))
    legacy = {
        k.replace("attention.q_proj", "attention.attention.query").replace(
            "attention.v_proj", "attention.attention.value"
        ): v
        for k, v in tensors.items()
    }
    assert any("attention.attention.query" in k for k in legacy)
    safetensors.numpy.save_file(legacy, str(weights), metadata={"format": "pt"})

    base = keras_hub.models.DINOV2Backbone.from_preset(str(dinov2_dir))
    model = keras_pvera.load_peft_adapter(base, tmp_path / "adapter")

    assert np.abs(keras_dinov2_outputs(model) - expected).max() <= TOLERANCE
    keras_pvera.save_peft_adapter(model, tmp_path / "legacy", naming="legacy")
    written = safetensors.numpy.load_file(
        str(tmp_path / "legacy" / "adapter_model.safetensors")
    )
    assert sorted(written) == sorted(legacy)


@pytest.mark.slow
def test_peft_adapter_saved_without_projections(hf, bert_dir, tmp_path):
    transformers = hf[1]
    peft = peft_model(
        hf,
        bert_dir,
        transformers.BertModel,
        r=8,
        target_modules=["query", "value"],
        projection_prng_key=11,
        save_projection=False,
    )
    expected = peft_bert_outputs(hf, peft)
    peft.save_pretrained(tmp_path / "adapter")
    saved = safetensors.numpy.load_file(
        str(tmp_path / "adapter" / "adapter_model.safetensors")
    )
    assert "base_model.pvera_A" not in saved

    base = keras_hub.models.BertBackbone.from_preset(str(bert_dir))
    model = keras_pvera.load_peft_adapter(base, tmp_path / "adapter")

    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.projection_registry.projection_a),
        peft.base_model.pvera_A["default"].numpy(),
    )
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.projection_registry.projection_b),
        peft.base_model.pvera_B["default"].numpy(),
    )
    actual = keras_bert_outputs(model)
    assert np.abs(actual - expected).max() <= TOLERANCE

    # Its projections are torch's, so it can be written without them too.
    keras_pvera.save_peft_adapter(model, tmp_path / "back", save_projection=False)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["save_projection"] is False
    assert config["projection_prng_key"] == 11
    back = peft_load(hf, bert_dir, transformers.BertModel, tmp_path / "back")
    assert np.abs(peft_bert_outputs(hf, back) - actual).max() <= TOLERANCE


@pytest.mark.slow
def test_peft_loaded_adapter_round_trips_through_keras_pvera_files(
    hf, bert_dir, tmp_path
):
    """PEFT's projections are not keras_pvera's: they travel in the file."""
    transformers = hf[1]
    peft = peft_model(
        hf,
        bert_dir,
        transformers.BertModel,
        r=8,
        target_modules=["query", "value"],
    )
    peft.save_pretrained(tmp_path / "adapter")
    base = keras_hub.models.BertBackbone.from_preset(str(bert_dir))
    model = keras_pvera.load_peft_adapter(base, tmp_path / "adapter")
    keras_pvera.save_adapter(model, tmp_path / "task.safetensors")

    again = keras_pvera.load_adapter(
        keras_hub.models.BertBackbone.from_preset(str(bert_dir)),
        tmp_path / "task.safetensors",
    )
    assert (
        np.abs(keras_bert_outputs(again) - peft_bert_outputs(hf, peft)).max()
        <= TOLERANCE
    )


# GPT-2's fused c_attn: PEFT's default target for GPT-2.


@pytest.fixture(scope="module")
def gpt2_dir(hf, tmp_path_factory):
    torch, transformers = hf
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    folder = tmp_path_factory.mktemp("hf_gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def peft_gpt2_logits(hf, model):
    torch, _ = hf
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(TOKENS),
            attention_mask=torch.ones(TOKENS.shape, dtype=torch.long),
        )
    return out.logits.float().numpy()


def keras_gpt2(folder):
    backbone = keras_hub.models.GPT2Backbone.from_preset(str(folder))
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def keras_gpt2_logits(model):
    inputs = {"token_ids": TOKENS, "padding_mask": np.ones(TOKENS.shape, bool)}
    return np.asarray(model.predict(inputs, verbose=0), "float32")


def gpt2_parts(model, i):
    backbone = model.base_model.backbone.name
    return [
        f"{backbone}/transformer_layer_{i}/self_attention/{part}"
        for part in ("query", "key", "value")
    ]


@pytest.mark.slow
def test_gpt2_default_c_attn_adapter_both_ways(hf, gpt2_dir, tmp_path, record_property):
    """PEFT's defaults adapt GPT-2's fused c_attn: KerasHub's query, key and
    value become one fused group, and the adapter goes back to PEFT."""
    transformers = hf[1]
    peft = peft_model(hf, gpt2_dir, transformers.GPT2LMHeadModel, r=8)
    assert peft.peft_config["default"].target_modules == {"c_attn"}
    expected = peft_gpt2_logits(hf, peft)
    with peft.disable_adapter():
        assert np.abs(expected - peft_gpt2_logits(hf, peft)).max() > 1e-2
    peft.save_pretrained(tmp_path / "adapter")

    model = keras_pvera.load_peft_adapter(keras_gpt2(gpt2_dir), tmp_path / "adapter")
    assert model.pvera_config.fused_groups == tuple(
        tuple(gpt2_parts(model, i)) for i in range(LAYERS)
    )
    actual = keras_gpt2_logits(model)
    to_keras = float(np.abs(actual - expected).max())
    record_property("peft_to_keras", to_keras)
    assert to_keras <= TOLERANCE

    keras_pvera.save_peft_adapter(model, tmp_path / "back")
    saved = safetensors.numpy.load_file(
        str(tmp_path / "back" / "adapter_model.safetensors")
    )
    written = safetensors.numpy.load_file(
        str(tmp_path / "adapter" / "adapter_model.safetensors")
    )
    assert sorted(saved) == sorted(written)
    for key, array in written.items():
        np.testing.assert_array_equal(saved[key], array)
    back = peft_load(hf, gpt2_dir, transformers.GPT2LMHeadModel, tmp_path / "back")
    to_peft = float(np.abs(peft_gpt2_logits(hf, back) - actual).max())
    record_property("keras_to_peft", to_peft)
    assert to_peft <= TOLERANCE


@pytest.mark.slow
def test_gpt2_c_attn_adapter_trained_in_keras_loads_in_peft(hf, gpt2_dir, tmp_path):
    """Trained in Keras, the group keeps one lambda_d, as PEFT's adapter."""
    transformers = hf[1]
    peft = peft_model(hf, gpt2_dir, transformers.GPT2LMHeadModel, r=8)
    peft.save_pretrained(tmp_path / "adapter")
    model = keras_pvera.load_peft_adapter(keras_gpt2(gpt2_dir), tmp_path / "adapter")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    inputs = {"token_ids": TOKENS, "padding_mask": np.ones(TOKENS.shape, bool)}
    model.fit(inputs, TOKENS, epochs=2, batch_size=2, verbose=0)
    layers = [model.adapted_layers[p] for p in gpt2_parts(model, 0)]
    assert layers[1].lambda_d is layers[0].lambda_d is layers[2].lambda_d
    expected = keras_gpt2_logits(model)

    keras_pvera.save_peft_adapter(model, tmp_path / "back")
    back = peft_load(hf, gpt2_dir, transformers.GPT2LMHeadModel, tmp_path / "back")
    assert np.abs(peft_gpt2_logits(hf, back) - expected).max() <= TOLERANCE


@pytest.mark.slow
def test_gpt2_c_attn_adapter_as_a_peft_lora(hf, gpt2_dir, tmp_path, record_property):
    """The fused group's mean is one LoRA on c_attn: one lora_A (the shared
    latent), lora_B rows of query, key and value in c_attn's order."""
    transformers = hf[1]
    peft_model(hf, gpt2_dir, transformers.GPT2LMHeadModel, r=8).save_pretrained(
        tmp_path / "adapter"
    )
    model = keras_pvera.load_peft_adapter(keras_gpt2(gpt2_dir), tmp_path / "adapter")
    expected = keras_gpt2_logits(model)

    keras_pvera.save_lora_adapter(model, tmp_path / "lora")
    tensors = safetensors.numpy.load_file(
        str(tmp_path / "lora" / "adapter_model.safetensors")
    )
    key = "base_model.model.transformer.h.0.attn.c_attn."
    assert tensors[key + "lora_A.weight"].shape == (8, HIDDEN)
    assert tensors[key + "lora_B.weight"].shape == (3 * HIDDEN, 8)
    lora = peft_load(hf, gpt2_dir, transformers.GPT2LMHeadModel, tmp_path / "lora")
    as_lora = peft_gpt2_logits(hf, lora)
    with lora.disable_adapter():
        assert np.abs(as_lora - peft_gpt2_logits(hf, lora)).max() > 1e-2
    difference = float(np.abs(as_lora - expected).max())
    record_property("keras_to_peft_lora", difference)
    assert difference <= TOLERANCE
    pvera = peft_load(hf, gpt2_dir, transformers.GPT2LMHeadModel, tmp_path / "adapter")
    difference = float(np.abs(as_lora - peft_gpt2_logits(hf, pvera)).max())
    record_property("peft_lora_to_peft_pvera", difference)
    assert difference <= TOLERANCE


def test_gpt2_part_saved_alone_names_the_fused_group(tmp_path):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    model = keras_pvera.apply(backbone, rank=2, target=["query", "value"])
    with pytest.raises(ValueError, match="fused group"):
        keras_pvera.save_peft_adapter(model, tmp_path / "adapter")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_base_keeps_a_float32_adapter(
    hf, gpt2_dir, tmp_path, dtype, record_property
):
    """PEFT's autocast_adapter_dtype (its default): over a float16/bfloat16
    base the vectors stay float32 and the adapter runs in float32."""
    torch, transformers = hf
    peft = peft_model(hf, gpt2_dir, transformers.GPT2LMHeadModel, r=8)
    peft.save_pretrained(tmp_path / "adapter")
    base = transformers.GPT2LMHeadModel.from_pretrained(
        gpt2_dir, dtype=getattr(torch, dtype)
    )
    from peft import PeftModel

    half = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert half.base_model.model.transformer.h[0].attn.c_attn.pvera_lambda_d[
        "default"
    ].dtype == (torch.float32)
    expected = peft_gpt2_logits(hf, half)

    backbone = keras_hub.models.GPT2Backbone.from_preset(str(gpt2_dir), dtype=dtype)
    model = keras_pvera.load_peft_adapter(
        keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None),
        tmp_path / "adapter",
    )
    for layer in model.adapted_layers.values():
        assert layer.lambda_d.dtype == layer.lambda_b.dtype == "float32"
        assert layer.base_layer.kernel.dtype == dtype
    inputs = {"token_ids": TOKENS, "padding_mask": np.ones(TOKENS.shape, bool)}
    logits = model(inputs)
    assert keras.backend.standardize_dtype(logits.dtype) == dtype
    difference = float(
        np.abs(
            keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32")) - expected
        ).max()
    )
    record_property(f"{dtype}_difference", difference)
    # Both round in half precision, in other orders: a few steps of it.
    step = float(np.finfo(np.float16).eps) if dtype == "float16" else 2.0**-7
    assert difference <= 4 * step * float(np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("is_trainable", [None, False, True])
def test_is_trainable_as_peft(hf, bert_dir, tmp_path, is_trainable):
    """PEFT's from_pretrained loads for inference unless is_trainable=True."""
    transformers = hf[1]
    from peft import PeftModel

    peft_model(
        hf, bert_dir, transformers.BertModel, r=4, target_modules=["query", "value"]
    ).save_pretrained(tmp_path / "adapter")
    kwargs = {} if is_trainable is None else {"is_trainable": is_trainable}
    loaded = PeftModel.from_pretrained(
        transformers.BertModel.from_pretrained(bert_dir),
        str(tmp_path / "adapter"),
        **kwargs,
    )
    trained = [n for n, p in loaded.named_parameters() if p.requires_grad]
    model = keras_pvera.load_peft_adapter(
        keras_hub.models.BertBackbone.from_preset(str(bert_dir)),
        tmp_path / "adapter",
        **kwargs,
    )
    assert len(model.trainable_weights) == len(trained)
    assert all("lambda" in n for n in trained)
    assert model.trainable is bool(is_trainable)

    # It stays so in a saved model.
    model.save(tmp_path / "model.keras")
    again = keras.saving.load_model(tmp_path / "model.keras")
    assert len(again.trainable_weights) == len(trained)


def test_is_trainable_must_be_a_bool(tmp_path):
    folder = write_peft_folder(tmp_path / "adapter", bert_query_value_tensors())
    with pytest.raises(ValueError, match="is_trainable='no'"):
        keras_pvera.load_peft_adapter(keras_bert(), folder, is_trainable="no")


@pytest.mark.slow
def test_generator_seed_round_trips_and_seeds_the_noise(hf, bert_dir, tmp_path):
    """PEFT's generator_seed seeds its sampling generators; None leaves them
    unseeded (torch's global generator). keras_pvera seeds its noise from
    generator_seed when set, else from the projection seed: always seeded."""
    transformers = hf[1]
    outputs = {}
    for generator_seed in (None, 3, 4):
        folder = tmp_path / f"adapter_{generator_seed}"
        peft = peft_model(
            hf,
            bert_dir,
            transformers.BertModel,
            r=4,
            target_modules=["query", "value"],
            sample_at_inference=True,
            generator_seed=generator_seed,
        )
        generator = peft.base_model.model.encoder.layer[0].attention.self.query
        assert (generator.pvera_generator["default"] is None) == (
            generator_seed is None
        )
        peft.save_pretrained(folder)
        model = keras_pvera.load_peft_adapter(
            keras_hub.models.BertBackbone.from_preset(str(bert_dir)), folder
        )
        assert model.pvera_config.generator_seed == generator_seed
        keras_pvera.save_peft_adapter(model, tmp_path / f"back_{generator_seed}")
        written = json.loads(
            (tmp_path / f"back_{generator_seed}" / "adapter_config.json").read_text()
        )
        assert written["generator_seed"] == generator_seed
        outputs[generator_seed] = [keras_bert_outputs(model) for _ in range(2)]
    for draws in outputs.values():
        assert np.abs(draws[0] - draws[1]).max() > 1e-4  # it samples
    # The same adapter with another generator seed draws other noise.
    assert np.abs(outputs[3][0] - outputs[4][0]).max() > 1e-4


@pytest.mark.parametrize("seed", [0, 5])
def test_generator_seed_repeats_the_noise(seed):
    """Same generator_seed, same samples; the projections stay `seed`'s."""
    x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")

    def samples(generator_seed):
        keras.utils.set_random_seed(1)
        base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="d")])
        model = keras_pvera.apply(
            base,
            rank=2,
            target=["d"],
            seed=seed,
            generator_seed=generator_seed,
            sample_at_inference=True,
        )
        layer = model.adapted_layers["d"]
        layer.lambda_b.assign(np.ones(6, "float32"))
        layer.lambda_d.assign(np.ones(4, "float32"))
        a = keras.ops.convert_to_numpy(model.projection_registry.projection_a)
        return a, [keras.ops.convert_to_numpy(model(x)) for _ in range(2)]

    a1, first = samples(seed + 10)
    a2, again = samples(seed + 10)
    a3, other = samples(seed + 11)
    np.testing.assert_array_equal(a1, a3)
    for one, two in zip(first, again, strict=True):
        np.testing.assert_array_equal(one, two)
    assert np.abs(first[0] - other[0]).max() > 1e-4
    with pytest.raises(ValueError, match="generator_seed=-1"):
        keras_pvera.PVeRAConfig(generator_seed=-1)


@pytest.mark.slow
def test_layers_to_transform_and_pattern(hf, gpt2_dir, tmp_path):
    """PEFT's layers_to_transform / layers_pattern pick blocks by number;
    its file names the modules in full, which is what keras_pvera reads."""
    transformers = hf[1]
    peft = peft_model(
        hf,
        gpt2_dir,
        transformers.GPT2LMHeadModel,
        r=8,
        layers_to_transform=[1],
        layers_pattern="h",
    )
    expected = peft_gpt2_logits(hf, peft)
    peft.save_pretrained(tmp_path / "adapter")

    model = keras_pvera.load_peft_adapter(keras_gpt2(gpt2_dir), tmp_path / "adapter")
    assert list(model.adapted_layers) == gpt2_parts(model, 1)
    actual = keras_gpt2_logits(model)
    assert np.abs(actual - expected).max() <= TOLERANCE

    # The same selection made in Keras: a regex over layer paths.
    again = keras_pvera.apply(
        keras_gpt2(gpt2_dir),
        rank=8,
        # docs/peft.md's regex (no "|": it sits in a table).
        target=r".*transformer_layer_1/self_attention/[kqv][a-z]*",
    )
    assert [p.split("/", 1)[1] for p in again.adapted_layers] == [
        p.split("/", 1)[1] for p in gpt2_parts(model, 1)
    ]

    keras_pvera.save_peft_adapter(model, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["transformer.h.1.attn.c_attn"]
    back = peft_load(hf, gpt2_dir, transformers.GPT2LMHeadModel, tmp_path / "back")
    assert np.abs(peft_gpt2_logits(hf, back) - actual).max() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("bias", ["pvera_only", "all"])
def test_trained_biases_are_refused_with_peft_s_reason(hf, bert_dir, tmp_path, bias):
    """PEFT's bias='pvera_only' / 'all' train and save base-model biases,
    so its disable_adapter() no longer gives the base model: keras_pvera,
    which keeps the base frozen, refuses such files and says why."""
    torch, transformers = hf
    tokens = torch.tensor(TOKENS)
    base = transformers.BertModel.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        reference = base(input_ids=tokens).last_hidden_state.numpy()
    peft = peft_model(
        hf,
        bert_dir,
        transformers.BertModel,
        r=4,
        target_modules=["query", "value"],
        bias=bias,
    )
    trained = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert any(n.endswith("base_layer.bias") for n in trained)
    optimizer = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad])
    peft.train()
    for _ in range(3):
        loss = (peft(input_ids=tokens).last_hidden_state - 1).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft.eval()
    with torch.no_grad(), peft.disable_adapter():
        disabled = peft(input_ids=tokens).last_hidden_state.numpy()
    assert np.abs(disabled - reference).max() > 1e-5
    peft.save_pretrained(tmp_path / "adapter")
    saved = safetensors.numpy.load_file(
        str(tmp_path / "adapter" / "adapter_model.safetensors")
    )
    assert any(k.endswith(".bias") for k in saved)

    model = keras_hub.models.BertBackbone.from_preset(str(bert_dir))
    before = numpy_weights(model)
    with pytest.raises(ValueError, match="disable_adapter"):
        keras_pvera.load_peft_adapter(model, tmp_path / "adapter")
    assert_untouched(model, before)
