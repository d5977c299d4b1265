"""PVeRA on a matrix of KerasHub architectures: a usage catalogue.

Each architecture is built tiny (hidden size 16, 1 or 2 layers, a
vocabulary of 64, images of 28 or 32 pixels) from its constructor
arguments, with random weights and nothing downloaded, as the model a user
would adapt: a text classifier for encoders, a `CausalLM` for decoders, a
`Seq2SeqLM` for BART and T5, an image classifier for ViT and MiT, and the
backbone where KerasHub 0.32 has no task (ELECTRA, Whisper) or for feature
extractors (DINOv2, DINOv3, CLIP, SAM); every task without a preprocessor,
so inputs are token ids and images. Each check is one test function
parametrized over the cases (`CASES`), and reads as the way to do that step
with such a model:

1. `apply` with the default targets keeps the base model's outputs;
2. `fit` trains the adapter vectors and a task's head, nothing else;
3. an adapter file loads onto a second build of the base model;
4. Monte Carlo passes differ;
5. `merge` and `merge_adapter` match the adapted model;
6. `generate` runs through the adapters, and sampled generations differ
   (generative tasks only);
7. `.keras` files round trip, in this process and in a fresh one (one
   architecture of each kind).

Not applicable: generation for models without `generate` (classifiers and
backbones); `predict_with_uncertainty` for SAM's backbone, one of whose
outputs has no batch axis (sampled `predict` calls instead).
"""

import dataclasses
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable

import keras
import numpy as np
import pytest

import keras_pvera
from keras_pvera.layer_selection import LINEAR_LAYERS
from keras_pvera.layer_selection import adaptable_layers
from keras_pvera.layer_selection import layer_addresses
from keras_pvera.layer_selection import layers_at
from keras_pvera.layer_selection import seen_as

keras_hub = pytest.importorskip("keras_hub")
models = keras_hub.models

# Minutes on JAX: outside the fast tier (`-m "not slow"`); CI runs it.
pytestmark = pytest.mark.slow

VOCABULARY = 64
LENGTH = 8
IMAGE = 28


# Inputs: functions of (rows, seed) giving what the model is called on.


def token_inputs(*extra):
    """Token ids, and for each name in `extra` (`"padding_mask"`,
    `"segment_ids"`) a mask of ones or ids of zeros."""

    def make(rows, seed):
        rng = np.random.default_rng(seed)
        inputs = {
            "token_ids": rng.integers(1, VOCABULARY, (rows, LENGTH)).astype("int32")
        }
        for name in extra:
            fill = np.ones if name == "padding_mask" else np.zeros
            inputs[name] = fill((rows, LENGTH), "int32")
        return inputs

    return make


def image_inputs(size=IMAGE, key=None):
    def make(rows, seed):
        rng = np.random.default_rng(seed)
        images = rng.uniform(size=(rows, size, size, 3)).astype("float32")
        return images if key is None else {key: images}

    return make


def seq2seq_inputs(rows, seed):
    rng = np.random.default_rng(seed)
    return {
        "encoder_token_ids": rng.integers(1, VOCABULARY, (rows, LENGTH)).astype(
            "int32"
        ),
        "encoder_padding_mask": np.ones((rows, LENGTH), "int32"),
        "decoder_token_ids": rng.integers(1, VOCABULARY, (rows, LENGTH)).astype(
            "int32"
        ),
        "decoder_padding_mask": np.ones((rows, LENGTH), "int32"),
    }


def whisper_inputs(rows, seed):
    rng = np.random.default_rng(seed)
    return {
        "encoder_features": rng.normal(size=(rows, 16, 8)).astype("float32"),
        "decoder_token_ids": rng.integers(1, VOCABULARY, (rows, LENGTH)).astype(
            "int32"
        ),
        "decoder_padding_mask": np.ones((rows, LENGTH), "int32"),
    }


def image_and_token_inputs(*extra):
    def make(rows, seed):
        inputs = token_inputs(*extra)(rows, seed)
        inputs["images"] = image_inputs()(rows, seed)
        return inputs

    return make


def sam_inputs(rows, seed):
    rng = np.random.default_rng(seed)
    return {
        "images": rng.uniform(size=(rows, 32, 32, 3)).astype("float32"),
        "points": rng.uniform(0, 32, (rows, 1, 2)).astype("float32"),
        "labels": np.ones((rows, 1), "float32"),
        "boxes": rng.uniform(0, 32, (rows, 1, 2, 2)).astype("float32"),
        "masks": np.zeros((rows, 0, 32, 32, 1), "float32"),
    }


# Builders: a tiny model with random weights, the same weights every call.


def seeded(build):
    def wrapper():
        keras.utils.set_random_seed(0)
        return build()

    wrapper.__name__ = build.__name__
    return wrapper


TEXT = dict(vocabulary_size=VOCABULARY, num_layers=2, hidden_dim=16)
DECODER = dict(TEXT, intermediate_dim=32, num_query_heads=2, num_key_value_heads=1)


@seeded
def bert():
    backbone = models.BertBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=LENGTH
    )
    return models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)


@seeded
def roberta():
    backbone = models.RobertaBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=LENGTH
    )
    return models.RobertaTextClassifier(backbone, num_classes=2, preprocessor=None)


@seeded
def distil_bert():
    backbone = models.DistilBertBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=LENGTH
    )
    return models.DistilBertTextClassifier(backbone, num_classes=2, preprocessor=None)


@seeded
def albert():
    backbone = models.AlbertBackbone(
        **TEXT,
        num_heads=2,
        embedding_dim=8,
        intermediate_dim=32,
        max_sequence_length=LENGTH,
    )
    return models.AlbertTextClassifier(backbone, num_classes=2, preprocessor=None)


@seeded
def deberta_v3():
    backbone = models.DebertaV3Backbone(
        **TEXT,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=LENGTH,
        bucket_size=4,
    )
    return models.DebertaV3TextClassifier(backbone, num_classes=2, preprocessor=None)


@seeded
def roformer_v2():
    backbone = models.RoformerV2Backbone(
        **TEXT, num_heads=2, intermediate_dim=32, head_size=8
    )
    return models.RoformerV2TextClassifier(backbone, num_classes=2, preprocessor=None)


@seeded
def esm():
    backbone = models.ESMBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=LENGTH
    )
    return models.ESMProteinClassifier(backbone, num_classes=2, preprocessor=None)


@seeded
def electra():
    # KerasHub 0.32 has no ELECTRA task: the backbone.
    return models.ElectraBackbone(
        vocab_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        embedding_dim=8,
        intermediate_dim=32,
        max_sequence_length=LENGTH,
    )


@seeded
def gpt2():
    backbone = models.GPT2Backbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=16
    )
    return models.GPT2CausalLM(backbone, preprocessor=None)


@seeded
def opt():
    backbone = models.OPTBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=16
    )
    return models.OPTCausalLM(backbone, preprocessor=None)


@seeded
def llama3():
    return models.Llama3CausalLM(models.Llama3Backbone(**DECODER), preprocessor=None)


@seeded
def mixtral():
    backbone = models.MixtralBackbone(
        **DECODER, num_experts=4, top_k=2, sliding_window=LENGTH
    )
    return models.MixtralCausalLM(backbone, preprocessor=None)


@seeded
def gemma():
    backbone = models.GemmaBackbone(**DECODER, head_dim=8)
    return models.GemmaCausalLM(backbone, preprocessor=None)


@seeded
def gemma3():
    # Text only: no vision encoder, so `image_size` is unused.
    backbone = models.Gemma3Backbone(
        **DECODER, head_dim=8, image_size=IMAGE, vision_encoder=None
    )
    return models.Gemma3CausalLM(backbone=backbone, preprocessor=None)


@seeded
def phi3():
    backbone = models.Phi3Backbone(
        **DECODER, max_sequence_length=16, pretraining_sequence_length=16
    )
    return models.Phi3CausalLM(backbone, preprocessor=None)


@seeded
def qwen3():
    backbone = models.Qwen3Backbone(**DECODER, head_dim=8)
    return models.Qwen3CausalLM(backbone, preprocessor=None)


@seeded
def qwen3_moe():
    backbone = models.Qwen3MoeBackbone(
        **DECODER, head_dim=8, moe_intermediate_dim=8, num_experts=4, top_k=2
    )
    return models.Qwen3MoeCausalLM(backbone, preprocessor=None)


@seeded
def falcon():
    backbone = models.FalconBackbone(**TEXT, num_attention_heads=2, intermediate_dim=32)
    return models.FalconCausalLM(backbone, preprocessor=None)


@seeded
def gpt_neox():
    backbone = models.GPTNeoXBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=16
    )
    return models.GPTNeoXCausalLM(backbone, preprocessor=None)


@seeded
def bloom():
    backbone = models.BloomBackbone(**TEXT, num_heads=2, intermediate_dim=32)
    return models.BloomCausalLM(backbone, preprocessor=None)


@seeded
def bart():
    backbone = models.BartBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=16
    )
    return models.BartSeq2SeqLM(backbone, preprocessor=None)


@seeded
def t5():
    backbone = models.T5Backbone(**TEXT, num_heads=2, intermediate_dim=32)
    return models.T5Seq2SeqLM(backbone, preprocessor=None)


@seeded
def whisper():
    # KerasHub 0.32 has no Whisper task: the backbone.
    return models.WhisperBackbone(
        **TEXT,
        num_heads=2,
        intermediate_dim=32,
        num_mels=8,
        max_encoder_sequence_length=16,
        max_decoder_sequence_length=16,
    )


@seeded
def vit():
    backbone = models.ViTBackbone(
        image_shape=(IMAGE, IMAGE, 3),
        patch_size=14,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    return models.ViTImageClassifier(backbone, num_classes=2, preprocessor=None)


@seeded
def mit():
    backbone = models.MiTBackbone(
        layerwise_depths=[1, 1],
        num_layers=2,
        layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[2, 1],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        hidden_dims=[8, 16],
        image_shape=(32, 32, 3),
    )
    return models.MiTImageClassifier(backbone, num_classes=2, preprocessor=None)


@seeded
def dinov2():
    return models.DINOV2Backbone(
        patch_size=14,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(IMAGE, IMAGE, 3),
    )


@seeded
def dinov3():
    return models.DINOV3Backbone(
        patch_size=14,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        num_register_tokens=1,
        image_shape=(IMAGE, IMAGE, 3),
    )


@seeded
def clip():
    return models.CLIPBackbone(
        vision_encoder=models.CLIPVisionEncoder(
            patch_size=14,
            hidden_dim=16,
            num_layers=2,
            num_heads=2,
            intermediate_dim=32,
            image_shape=(IMAGE, IMAGE, 3),
        ),
        text_encoder=models.CLIPTextEncoder(
            vocabulary_size=VOCABULARY,
            embedding_dim=16,
            hidden_dim=16,
            num_layers=2,
            num_heads=2,
            intermediate_dim=32,
            max_sequence_length=LENGTH,
        ),
        projection_dim=8,
    )


@seeded
def sam():
    return models.SAMBackbone(
        image_encoder=models.ViTDetBackbone(
            hidden_size=16,
            num_layers=2,
            intermediate_dim=32,
            num_heads=2,
            global_attention_layer_indices=[1],
            patch_size=16,
            num_output_channels=8,
            window_size=2,
            image_shape=(32, 32, 3),
        ),
        prompt_encoder=keras_hub.layers.SAMPromptEncoder(
            hidden_size=8,
            image_embedding_size=(2, 2),
            input_image_size=(32, 32),
            mask_in_channels=16,
        ),
        mask_decoder=keras_hub.layers.SAMMaskDecoder(
            num_layers=1,
            hidden_size=8,
            intermediate_dim=16,
            num_heads=2,
            embedding_dim=8,
            num_multimask_outputs=3,
            iou_head_depth=2,
            iou_head_hidden_dim=8,
        ),
    )


@seeded
def pali_gemma():
    backbone = models.PaliGemmaBackbone(
        **DECODER,
        image_size=IMAGE,
        head_dim=8,
        vit_patch_size=14,
        vit_num_heads=2,
        vit_hidden_dim=16,
        vit_num_layers=1,
        vit_intermediate_dim=32,
    )
    return models.PaliGemmaCausalLM(backbone=backbone, preprocessor=None)


@dataclasses.dataclass(frozen=True)
class Case:
    """One architecture: how to build it tiny, and what `target=None` adapts.

    Attributes:
        name: The architecture.
        kind: `"encoder"`, `"decoder"`, `"encoder-decoder"` or `"vision"`.
        build: Builds the model (the same random weights on every call).
        inputs: `(rows, seed) -> inputs` the model is called on.
        targets: What `target=None` adapts: the layers' names, or the
            attributes holding them where Keras names them `dense_<n>`.
        adapted: How many layers `target=None` adapts.
        fallback: Whether those are attention projections found by name
            (the backbone's `default_lora_layer_names()` match no layer;
            `apply` warns).
        generative: Whether the task has `generate()`.
        output: For a backbone with several outputs, the one `fit` trains.
        batched_outputs: Whether every output has the batch on its first
            axis (`predict_with_uncertainty` needs it).
    """

    name: str
    kind: str
    build: Callable[[], keras.Model]
    inputs: Callable[[int, int], object]
    targets: tuple
    adapted: int
    fallback: bool = False
    generative: bool = False
    output: str | None = None
    batched_outputs: bool = True

    def __str__(self):
        return self.name


QUERY_VALUE = ("query", "value")
TOKENS = token_inputs("padding_mask")

CASES = [
    # Encoders: text classifiers (the head trains in full).
    Case(
        "bert",
        "encoder",
        bert,
        token_inputs("padding_mask", "segment_ids"),
        QUERY_VALUE,
        4,
    ),
    Case("roberta", "encoder", roberta, TOKENS, QUERY_VALUE, 4),
    Case("distil_bert", "encoder", distil_bert, TOKENS, QUERY_VALUE, 4),
    # ALBERT shares one transformer layer between its 2 layers.
    Case(
        "albert",
        "encoder",
        albert,
        token_inputs("padding_mask", "segment_ids"),
        QUERY_VALUE,
        2,
    ),
    Case("deberta_v3", "encoder", deberta_v3, TOKENS, QUERY_VALUE, 4),
    Case(
        "roformer_v2",
        "encoder",
        roformer_v2,
        token_inputs("segment_ids"),
        ("q_dense_layer", "v_dense_layer"),
        4,
        fallback=True,
    ),
    Case(
        "esm",
        "encoder",
        esm,
        token_inputs(),
        ("q_dense_layer", "v_dense_layer"),
        4,
        fallback=True,
    ),
    # KerasHub 0.32 has no ELECTRA task: the backbone.
    Case(
        "electra",
        "encoder",
        electra,
        token_inputs("padding_mask", "segment_ids"),
        QUERY_VALUE,
        4,
        output="pooled_output",
    ),
    # Decoders: causal LMs.
    Case("gpt2", "decoder", gpt2, TOKENS, QUERY_VALUE, 4, generative=True),
    Case("opt", "decoder", opt, TOKENS, QUERY_VALUE, 4, generative=True),
    Case("llama3", "decoder", llama3, TOKENS, QUERY_VALUE, 4, generative=True),
    Case("mixtral", "decoder", mixtral, TOKENS, QUERY_VALUE, 4, generative=True),
    Case("gemma", "decoder", gemma, TOKENS, QUERY_VALUE, 4, generative=True),
    Case("gemma3", "decoder", gemma3, TOKENS, QUERY_VALUE, 4, generative=True),
    Case("phi3", "decoder", phi3, TOKENS, QUERY_VALUE, 4, generative=True),
    Case("qwen3", "decoder", qwen3, TOKENS, QUERY_VALUE, 4, generative=True),
    Case("qwen3_moe", "decoder", qwen3_moe, TOKENS, QUERY_VALUE, 4, generative=True),
    Case(
        "falcon",
        "decoder",
        falcon,
        TOKENS,
        ("query_dense", "value_dense"),
        4,
        generative=True,
    ),
    # One fused query/key/value projection per block, adapted as one layer.
    Case(
        "gpt_neox",
        "decoder",
        gpt_neox,
        TOKENS,
        ("query_key_value",),
        2,
        fallback=True,
        generative=True,
    ),
    Case(
        "bloom",
        "decoder",
        bloom,
        TOKENS,
        ("query_dense", "value_dense"),
        4,
        generative=True,
    ),
    # Encoder-decoders: self- and cross-attention of both stacks.
    Case(
        "bart",
        "encoder-decoder",
        bart,
        seq2seq_inputs,
        QUERY_VALUE,
        12,
        generative=True,
    ),
    Case(
        "t5",
        "encoder-decoder",
        t5,
        seq2seq_inputs,
        ("query_projector", "value_projector"),
        12,
        fallback=True,
        generative=True,
    ),
    # KerasHub 0.32 has no Whisper task: the backbone.
    Case(
        "whisper",
        "encoder-decoder",
        whisper,
        whisper_inputs,
        QUERY_VALUE,
        12,
        output="decoder_sequence_output",
    ),
    # Vision: image classifiers (the head trains in full) and backbones.
    Case("vit", "vision", vit, image_inputs(), QUERY_VALUE, 4),
    # MiT names its attention projections `q`, `k`, `v` (layers `dense_<n>`).
    Case("mit", "vision", mit, image_inputs(32), ("q", "v"), 4, fallback=True),
    Case("dinov2", "vision", dinov2, image_inputs(key="images"), QUERY_VALUE, 4),
    Case(
        "dinov3",
        "vision",
        dinov3,
        image_inputs(key="pixel_values"),
        ("q_proj", "v_proj"),
        4,
        fallback=True,
    ),
    # Both towers; fit trains on the image-text similarities.
    Case(
        "clip",
        "vision",
        clip,
        image_and_token_inputs(),
        QUERY_VALUE,
        8,
        output="vision_logits",
    ),
    # The image encoder's fused `qkv`; the mask decoder is not called by the
    # backbone, so its layers are skipped (`apply` warns).
    Case(
        "sam",
        "vision",
        sam,
        sam_inputs,
        ("qkv",),
        2,
        fallback=True,
        output="image_embeddings",
        batched_outputs=False,  # `prompt_dense_positional_embeddings`
    ),
    # The Gemma decoder's query/value and the vision tower's.
    Case(
        "pali_gemma",
        "vision",
        pali_gemma,
        image_and_token_inputs("padding_mask", "response_mask"),
        ("query", "query_proj", "value", "value_proj"),
        6,
        generative=True,
    ),
]

CASE_BY_NAME = {case.name: case for case in CASES}
GENERATIVE = [case for case in CASES if case.generative]
FALLBACK_WARNING = "has none of its KerasHub default LoRA layers"


def adapt(case, base=None, **settings):
    """`keras_pvera.apply` with the default targets (`target=None`)."""
    base = case.build() if base is None else base
    with warnings.catch_warnings():
        # Expected notes (see test_default_targets): fallback targets, and
        # SAM's mask decoder, which its backbone never calls.
        warnings.filterwarnings("ignore", message=f".*{FALLBACK_WARNING}")
        warnings.filterwarnings("ignore", message=".*chosen layers are not built")
        return keras_pvera.apply(base, rank=4, **settings)


def vectors(model):
    return [
        w
        for layer in model.adapted_layers.values()
        for w in (layer.lambda_d, layer.lambda_b)
    ]


def head_weights(model):
    """The weights of the layers trained in full (a task's head)."""
    layers = layers_at(model.base_model, model.trainable_paths)
    return [w for layer in layers.values() for w in layer.weights]


def randomize(model, seed=0, scale=1.0):
    """Random adapter vectors (`scale` times N(0, 1)) and a moved head."""
    rng = np.random.default_rng(seed)
    for weight in vectors(model):
        weight.assign(scale * rng.normal(size=weight.shape).astype("float32"))
    for weight in head_weights(model):
        value = keras.ops.convert_to_numpy(weight)
        weight.assign(value + 0.1 * rng.normal(size=value.shape).astype(value.dtype))
    return model


def numpy_outputs(outputs):
    """Outputs as `{name: array}` (`{"output": array}` for a single one)."""
    if isinstance(outputs, dict):
        return {k: keras.ops.convert_to_numpy(v) for k, v in outputs.items()}
    return {"output": keras.ops.convert_to_numpy(outputs)}


def assert_same_outputs(actual, expected, rtol=0.0, atol=0.0):
    actual, expected = numpy_outputs(actual), numpy_outputs(expected)
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=rtol, atol=atol, err_msg=key
        )


def assert_different_outputs(first, second):
    first, second = numpy_outputs(first), numpy_outputs(second)
    assert any(not np.allclose(first[k], second[k]) for k in first)


def target_names(model):
    """What each adapted layer is called: its name, or, where Keras named it
    `dense_<n>`, the attribute holding it (`q`, `kv`, `qkv`)."""
    addresses = layer_addresses(model.base_model, list(model.adapted_layers))
    names = set()
    for path, (address, _) in addresses.items():
        name = path.split("/")[-1]
        if re.fullmatch(r"dense(_\d+)?", name):
            name = address.split("/")[-1].split("[")[0].lstrip("_")
        names.add(name)
    return tuple(sorted(names))


def linear_layer_count(model):
    return sum(
        isinstance(seen_as(layer), LINEAR_LAYERS)
        for _, layer in adaptable_layers(model)
    )


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


@pytest.mark.slow
def test_keras_files_load_in_a_fresh_process(tmp_path):
    """A fresh process rebuilds each base from its saved configuration and
    finds the adapted layers again (by name, else by address)."""
    names = ["gpt2", "bart", "vit"]
    for name in names:
        case = CASE_BY_NAME[name]
        model = randomize(adapt(case))
        model.save(str(tmp_path / f"{name}.keras"))
        x = case.inputs(4, 4)
        np.savez(
            tmp_path / f"{name}_inputs.npz", **x if isinstance(x, dict) else {"": x}
        )
        np.save(tmp_path / f"{name}_expected.npy", model.predict(x, verbose=0))
    script = f"""
import numpy as np, keras, keras_pvera
for name in {names!r}:
    model = keras.models.load_model(f"{tmp_path}/{{name}}.keras")
    inputs = dict(np.load(f"{tmp_path}/{{name}}_inputs.npz"))
    inputs = inputs.get("", inputs)  # an array saved under ""
    expected = np.load(f"{tmp_path}/{{name}}_expected.npy")
    error = np.abs(model.predict(inputs, verbose=0) - expected).max()
    print(name, len(model.adapted_layers), error)
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
    for name in names:
        adapted, error = lines[name]
        assert int(adapted) == CASE_BY_NAME[name].adapted
        assert float(error) <= 1e-6, (name, error)
