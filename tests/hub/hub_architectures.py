"""Tiny KerasHub architectures, their inputs and helpers, shared by the
architecture matrix (tests/hub/test_keras_hub_architectures.py, which
describes the cases) and the tests of LoRA files, export and generation.

Importing this module skips the importing test module when `keras-hub` is
missing.
"""

import dataclasses
import functools
import io
import re
import warnings
from collections.abc import Callable

import keras
import numpy as np
import pytest
from hub_models import sam
from hub_models import sam_inputs

import keras_pvera
from keras_pvera.src.surgery.layer_selection import LINEAR_LAYERS
from keras_pvera.src.surgery.layer_selection import adaptable_layers
from keras_pvera.src.surgery.layer_selection import layer_addresses
from keras_pvera.src.surgery.layer_selection import layers_at
from keras_pvera.src.surgery.layer_selection import seen_as

keras_hub = pytest.importorskip("keras_hub")
models = keras_hub.models

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


# Text: raw strings, and in-memory tokenizers of the three kinds KerasHub's
# text tasks use (WordPiece, byte-pair, SentencePiece) whose token ids are all
# below VOCABULARY, for the tasks built with their preprocessor.

TEXTS = ["the cat sat on the mat", "a dog ran", "the dog sat on a cat", "a cat ran"]
WORDS = sorted({word for text in TEXTS for word in text.split()})
# The special tokens these architectures' tokenizers look up, by kind.
WORD_PIECE_SPECIAL_TOKENS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] <pad> <unk> <cls> <eos> <mask>"
)
BYTE_PAIR_SPECIAL_TOKENS = (
    "<pad> <s> </s> <mask> <|endoftext|> <|im_end|> <|begin_of_text|> "
    "<|end_of_text|> <|eot_id|> <|start_header_id|> <|end_header_id|>"
)
SENTENCE_PIECE_SPECIAL_TOKENS = (
    "[CLS] [SEP] [PAD] [MASK] <bos> <eos> <|endoftext|> <img> <start_of_image> "
    "<end_of_image>"
)


def byte_pair_vocabulary():
    """Every letter of `WORDS`, and each word, after GPT-2's leading-space
    marker `Ġ` or alone (the first word of a text), built by a chain of
    merges."""
    special_tokens = BYTE_PAIR_SPECIAL_TOKENS.split()
    vocabulary = {token: i for i, token in enumerate(special_tokens)}
    for character in "Ġ" + "".join(sorted(set("".join(WORDS)))):
        vocabulary.setdefault(character, len(vocabulary))
    merges = []
    for start in ("Ġ", ""):
        for word in WORDS:
            token = start
            for character in word:
                if token and f"{token} {character}" not in merges:
                    merges.append(f"{token} {character}")
                token += character
                vocabulary.setdefault(token, len(vocabulary))
    assert len(vocabulary) <= VOCABULARY
    return vocabulary, merges


@functools.cache
def sentence_piece_proto():
    """A byte-pair SentencePiece model of `TEXTS`, trained in memory."""
    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS),
        model_writer=proto,
        model_type="bpe",
        vocab_size=40,  # below VOCABULARY
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        user_defined_symbols=SENTENCE_PIECE_SPECIAL_TOKENS.split(),
        minloglevel=2,
    )
    return proto.getvalue()


def text_tokenizer(tokenizer_class):
    """An instance of a KerasHub tokenizer class, made in memory."""
    if issubclass(tokenizer_class, keras_hub.tokenizers.WordPieceTokenizer):
        return tokenizer_class(vocabulary=WORD_PIECE_SPECIAL_TOKENS.split() + WORDS)
    if issubclass(tokenizer_class, keras_hub.tokenizers.BytePairTokenizer):
        vocabulary, merges = byte_pair_vocabulary()
        return tokenizer_class(vocabulary=vocabulary, merges=merges)
    return tokenizer_class(proto=sentence_piece_proto())


def text_task(task_class, backbone, preprocessor, **kwargs):
    """`task_class` on `backbone`, with its preprocessor (`preprocessor=True`:
    as `from_preset` attaches it, over an in-memory tokenizer) or none."""
    if preprocessor:
        preprocessor_class = task_class.preprocessor_cls
        tokenizer = text_tokenizer(preprocessor_class.tokenizer_cls)
        if issubclass(task_class, models.Seq2SeqLM):
            lengths = dict(
                encoder_sequence_length=LENGTH, decoder_sequence_length=LENGTH
            )
        else:
            lengths = dict(sequence_length=LENGTH)
        preprocessor = preprocessor_class(tokenizer=tokenizer, **lengths)
    else:
        preprocessor = None
    return task_class(backbone=backbone, preprocessor=preprocessor, **kwargs)


def raw_text(case, rows=4):
    """Raw inputs of a task built with its preprocessor, and labels (`None`
    for generative tasks, whose preprocessor makes next-token labels)."""
    texts = TEXTS[:rows]
    if case.kind == "encoder-decoder":
        return {"encoder_text": texts, "decoder_text": texts[::-1]}, None
    if case.name == "gemma3":
        return {"prompts": texts, "responses": texts[::-1]}, None
    if case.kind == "encoder":
        return texts, np.arange(rows) % 2
    return texts, None


def network_inputs(task, x):
    """What a task's network is called on for raw inputs `x`: its
    preprocessor's output, without the labels it makes for generative tasks."""
    outputs = task.preprocessor(x)
    return outputs[0] if isinstance(outputs, tuple) else outputs


def tokenized(task):
    """The token ids of each of `TEXTS` by the task's tokenizer."""
    tokenizer = task.preprocessor.tokenizer
    return [keras.ops.convert_to_numpy(tokenizer(text)).tolist() for text in TEXTS]


# Builders: a tiny model with random weights, the same weights every call.


def seeded(build):
    def wrapper(**kwargs):
        keras.utils.set_random_seed(0)
        return build(**kwargs)

    wrapper.__name__ = build.__name__
    return wrapper


TEXT = dict(vocabulary_size=VOCABULARY, num_layers=2, hidden_dim=16)
DECODER = dict(TEXT, intermediate_dim=32, num_query_heads=2, num_key_value_heads=1)


@seeded
def bert(preprocessor=False):
    backbone = models.BertBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=LENGTH
    )
    return text_task(models.BertTextClassifier, backbone, preprocessor, num_classes=2)


@seeded
def roberta(preprocessor=False):
    backbone = models.RobertaBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=LENGTH
    )
    return text_task(
        models.RobertaTextClassifier, backbone, preprocessor, num_classes=2
    )


@seeded
def distil_bert(preprocessor=False):
    backbone = models.DistilBertBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=LENGTH
    )
    return text_task(
        models.DistilBertTextClassifier, backbone, preprocessor, num_classes=2
    )


@seeded
def albert(preprocessor=False):
    backbone = models.AlbertBackbone(
        **TEXT,
        num_heads=2,
        embedding_dim=8,
        intermediate_dim=32,
        max_sequence_length=LENGTH,
    )
    return text_task(models.AlbertTextClassifier, backbone, preprocessor, num_classes=2)


@seeded
def deberta_v3(preprocessor=False):
    backbone = models.DebertaV3Backbone(
        **TEXT,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=LENGTH,
        bucket_size=4,
    )
    return text_task(
        models.DebertaV3TextClassifier, backbone, preprocessor, num_classes=2
    )


@seeded
def roformer_v2(preprocessor=False):
    backbone = models.RoformerV2Backbone(
        **TEXT, num_heads=2, intermediate_dim=32, head_size=8
    )
    return text_task(
        models.RoformerV2TextClassifier, backbone, preprocessor, num_classes=2
    )


@seeded
def esm(preprocessor=False):
    backbone = models.ESMBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=LENGTH
    )
    return text_task(models.ESMProteinClassifier, backbone, preprocessor, num_classes=2)


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
def gpt2(preprocessor=False):
    backbone = models.GPT2Backbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=16
    )
    return text_task(models.GPT2CausalLM, backbone, preprocessor)


@seeded
def opt(preprocessor=False):
    backbone = models.OPTBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=16
    )
    return text_task(models.OPTCausalLM, backbone, preprocessor)


@seeded
def llama3(preprocessor=False):
    return text_task(
        models.Llama3CausalLM, models.Llama3Backbone(**DECODER), preprocessor
    )


@seeded
def mixtral(preprocessor=False):
    backbone = models.MixtralBackbone(
        **DECODER, num_experts=4, top_k=2, sliding_window=LENGTH
    )
    return text_task(models.MixtralCausalLM, backbone, preprocessor)


@seeded
def gemma(preprocessor=False):
    backbone = models.GemmaBackbone(**DECODER, head_dim=8)
    return text_task(models.GemmaCausalLM, backbone, preprocessor)


@seeded
def gemma3(preprocessor=False):
    # Text only: no vision encoder, so `image_size` is unused.
    backbone = models.Gemma3Backbone(
        **DECODER, head_dim=8, image_size=IMAGE, vision_encoder=None
    )
    return text_task(models.Gemma3CausalLM, backbone, preprocessor)


@seeded
def phi3(preprocessor=False):
    backbone = models.Phi3Backbone(
        **DECODER, max_sequence_length=16, pretraining_sequence_length=16
    )
    return text_task(models.Phi3CausalLM, backbone, preprocessor)


@seeded
def qwen3(preprocessor=False):
    backbone = models.Qwen3Backbone(**DECODER, head_dim=8)
    return text_task(models.Qwen3CausalLM, backbone, preprocessor)


@seeded
def qwen3_moe(preprocessor=False):
    backbone = models.Qwen3MoeBackbone(
        **DECODER, head_dim=8, moe_intermediate_dim=8, num_experts=4, top_k=2
    )
    return text_task(models.Qwen3MoeCausalLM, backbone, preprocessor)


@seeded
def falcon(preprocessor=False):
    backbone = models.FalconBackbone(**TEXT, num_attention_heads=2, intermediate_dim=32)
    return text_task(models.FalconCausalLM, backbone, preprocessor)


@seeded
def gpt_neox(preprocessor=False):
    backbone = models.GPTNeoXBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=16
    )
    return text_task(models.GPTNeoXCausalLM, backbone, preprocessor)


@seeded
def bloom(preprocessor=False):
    backbone = models.BloomBackbone(**TEXT, num_heads=2, intermediate_dim=32)
    return text_task(models.BloomCausalLM, backbone, preprocessor)


@seeded
def bart(preprocessor=False):
    backbone = models.BartBackbone(
        **TEXT, num_heads=2, intermediate_dim=32, max_sequence_length=16
    )
    return text_task(models.BartSeq2SeqLM, backbone, preprocessor)


@seeded
def t5(preprocessor=False):
    backbone = models.T5Backbone(**TEXT, num_heads=2, intermediate_dim=32)
    return text_task(models.T5Seq2SeqLM, backbone, preprocessor)


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
        text: Whether `build(preprocessor=True)` gives the text task with
            its preprocessor (over an in-memory tokenizer), which takes raw
            text (`raw_text`).
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
    text: bool = False

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
        text=True,
    ),
    Case("roberta", "encoder", roberta, TOKENS, QUERY_VALUE, 4, text=True),
    Case("distil_bert", "encoder", distil_bert, TOKENS, QUERY_VALUE, 4, text=True),
    # ALBERT shares one transformer layer between its 2 layers.
    Case(
        "albert",
        "encoder",
        albert,
        token_inputs("padding_mask", "segment_ids"),
        QUERY_VALUE,
        2,
        text=True,
    ),
    Case("deberta_v3", "encoder", deberta_v3, TOKENS, QUERY_VALUE, 4, text=True),
    Case(
        "roformer_v2",
        "encoder",
        roformer_v2,
        token_inputs("segment_ids"),
        ("q_dense_layer", "v_dense_layer"),
        4,
        fallback=True,
        text=True,
    ),
    Case(
        "esm",
        "encoder",
        esm,
        token_inputs(),
        ("q_dense_layer", "v_dense_layer"),
        4,
        fallback=True,
        text=True,
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
    Case("gpt2", "decoder", gpt2, TOKENS, QUERY_VALUE, 4, generative=True, text=True),
    Case("opt", "decoder", opt, TOKENS, QUERY_VALUE, 4, generative=True, text=True),
    Case(
        "llama3", "decoder", llama3, TOKENS, QUERY_VALUE, 4, generative=True, text=True
    ),
    Case(
        "mixtral",
        "decoder",
        mixtral,
        TOKENS,
        QUERY_VALUE,
        4,
        generative=True,
        text=True,
    ),
    Case("gemma", "decoder", gemma, TOKENS, QUERY_VALUE, 4, generative=True, text=True),
    Case(
        "gemma3", "decoder", gemma3, TOKENS, QUERY_VALUE, 4, generative=True, text=True
    ),
    Case("phi3", "decoder", phi3, TOKENS, QUERY_VALUE, 4, generative=True, text=True),
    Case("qwen3", "decoder", qwen3, TOKENS, QUERY_VALUE, 4, generative=True, text=True),
    Case(
        "qwen3_moe",
        "decoder",
        qwen3_moe,
        TOKENS,
        QUERY_VALUE,
        4,
        generative=True,
        text=True,
    ),
    Case(
        "falcon",
        "decoder",
        falcon,
        TOKENS,
        ("query_dense", "value_dense"),
        4,
        generative=True,
        text=True,
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
        text=True,
    ),
    Case(
        "bloom",
        "decoder",
        bloom,
        TOKENS,
        ("query_dense", "value_dense"),
        4,
        generative=True,
        text=True,
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
        text=True,
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
        text=True,
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
    """The weights of the layers trained in full (a task's head): those of
    the active adapter's copy, which trains while the original stays."""
    layers = layers_at(model.base_model, model.trainable_paths)
    running = [
        layer.current_layer() if hasattr(layer, "current_layer") else layer
        for layer in layers.values()
    ]
    return [w for layer in running for w in layer.weights]


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
