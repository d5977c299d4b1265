"""Which Hugging Face module is which KerasHub layer, per architecture.

PEFT names an adapted layer by its PyTorch module path in the Hugging Face
model (`encoder.layer.0.attention.self.query`); keras_pvera by its layer path
in the KerasHub model (`transformer_layer_0/self_attention_layer/query`).
Each architecture whose transformers checkpoints KerasHub converts has one
`ArchitectureSpec` here, written from its converter
(`keras_hub/src/utils/transformers/convert_<name>.py`): one `LinearMap` per
linear module the converter ports into a `Dense` / `EinsumDense` kernel, one
`Refusal` per module PEFT can adapt that has no KerasHub equivalent (with the
reason), and one `TaskHead` per task head PEFT's `modules_to_save` can carry.

Layouts. PVeRA adapts a linear map: PEFT's vectors and projections carry
over unchanged when the Keras kernel, read as an `(in, out)` matrix (its
contracted axes flattened to `in`, its output axes to `out`, row-major in
kernel order, as `PVeRADense` reads it), equals the torch module's map. The
converters port kernels in one of these ways, all of which keep that:

- `"transposed"`: a `Dense` kernel is the torch `Linear` weight transposed.
- `"heads"`: an `EinsumDense` kernel is the `Linear` weight transposed and
  reshaped row-major to per-head axes (`(hidden, heads, head_dim)` for a
  query, `(heads, head_dim, hidden)` for an attention output; Gemma's
  `(heads, hidden, head_dim)` permutes the contracted axis away from the
  head axes, which leaves each flattening unchanged).
- `"conv1d"`: GPT-2's `Conv1D` stores its weight `(in, out)` already and the
  kernel is that weight, reshaped.

A torch module that KerasHub splits into several layers whose outputs
concatenate to the module's (GPT-2's fused `c_attn`: `query`, `key`,
`value`) is a `FusedMap`: its adapter becomes a fused group of the parts
(`PVeRAConfig.fused_groups`). A torch module that KerasHub computes without
a Dense layer (tied `lm_head`), or keeps as one batched tensor (MoE experts)
is a `Refusal`.

Module names depend on the transformers version: transformers 5 names ViT's,
DeiT's and DINOv2's attention projections `attention.q_proj/k_proj/v_proj/
o_proj`, older versions `attention.attention.query/key/value` and
`attention.output.dense` (the checkpoint keys KerasHub's converters read). A
`LinearMap` holds both names; reading accepts both.
"""

import dataclasses
import importlib.metadata
import math
import re

import numpy as np

from keras_pvera.src.layers.linear_map import LinearEquation
from keras_pvera.src.surgery import layer_walk

NAMINGS = ("transformers5", "legacy")
LAYOUTS = ("transposed", "heads", "conv1d")

_PLACEHOLDER = re.compile(r"\{(\w+)(?:\+(\d+))?\}")


def _pattern(template):
    """A regex for a `{i}` / `{i+1}` template, and each field's offset."""
    pieces, offsets, position = [], {}, 0
    for match in _PLACEHOLDER.finditer(template):
        pieces.append(re.escape(template[position : match.start()]))
        name, offset = match.group(1), int(match.group(2) or 0)
        if name in offsets:
            pieces.append(f"(?P={name})")
        else:
            pieces.append(rf"(?P<{name}>\d+)")
        offsets[name] = offset
        position = match.end()
    pieces.append(re.escape(template[position:]))
    return re.compile("".join(pieces)), offsets


def _match(template, name):
    """The block numbers `template` gives `name` (offsets removed), or None."""
    pattern, offsets = _pattern(template)
    match = pattern.fullmatch(name)
    if match is None:
        return None
    return {k: int(v) - offsets[k] for k, v in match.groupdict().items()}


def _fill(template, numbers):
    def field(match):
        return str(numbers[match.group(1)] + int(match.group(2) or 0))

    return _PLACEHOLDER.sub(field, template)


def match_template(template, name):
    """The block numbers a `{i}` template gives a name, or `None`.

    Example:

    >>> match_template("h.{i}.attn.c_attn", "h.3.attn.c_attn")
    {'i': 3}
    """
    return _match(template, name)


def fill_template(template, numbers):
    """A `{i}` template with its block numbers filled in.

    Example:

    >>> fill_template("transformer_layer_{i}/self_attention", {"i": 3})
    'transformer_layer_3/self_attention'
    """
    return _fill(template, numbers)


@dataclasses.dataclass(frozen=True)
class LinearMap:
    """A torch linear module and the KerasHub layer holding the same map.

    Args:
        hf: The module name in transformers 5, relative to the Hugging Face
            base model (`BertModel`, `LlamaModel`, ...); `{i}` stands for a
            block number.
        keras: The KerasHub layer path relative to the backbone; `{i}` is
            the same number, `{i+1}` that number plus one.
        layout: How the converter lays the torch weight into the kernel,
            one of `LAYOUTS`.
        legacy: The module name in transformers 4, when it differs.
    """

    hf: str
    keras: str
    layout: str = "transposed"
    legacy: str = None

    def hf_name(self, naming):
        return self.legacy if naming == "legacy" and self.legacy else self.hf

    def hf_names(self):
        return (self.hf,) if self.legacy is None else (self.hf, self.legacy)


@dataclasses.dataclass(frozen=True)
class FusedMap:
    """A torch linear module that KerasHub splits into several layers.

    The module's output rows are the parts' outputs one after another, in
    `keras` order (GPT-2's `c_attn`: query, key, value), each part laid out
    as `layout` says.

    Args:
        hf: The module name template, relative to the base model.
        keras: The KerasHub layer path templates of the parts, in the
            module's output order.
        layout: How the converter lays each part's weight, one of `LAYOUTS`.
    """

    hf: str
    keras: tuple
    layout: str = "transposed"

    def keras_paths(self, hf_module):
        """The parts' paths for a module name, or `None` if it does not match."""
        numbers = _match(self.hf, hf_module)
        if numbers is None:
            return None
        return tuple(_fill(part, numbers) for part in self.keras)

    def hf_name(self, keras_paths):
        """The module name of the parts' paths, or `None`."""
        numbers = _match(self.keras[0], keras_paths[0])
        if numbers is None or tuple(keras_paths) != tuple(
            _fill(part, numbers) for part in self.keras
        ):
            return None
        return _fill(self.hf, numbers)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A torch module PEFT can adapt that keras_pvera cannot map, and why.

    Args:
        hf: Module name template, relative to the base model; `{i}` stands
            for a block number, `*` for any rest of the name.
        reason: Why KerasHub has no equal linear map, completing "KerasHub
            ...".
    """

    hf: str
    reason: str

    def matches(self, module):
        head, star, _ = self.hf.partition("*")
        pattern, _ = _pattern(head)
        if star:
            return pattern.match(module) is not None
        return pattern.fullmatch(module) is not None


@dataclasses.dataclass(frozen=True)
class TaskHead:
    """A Hugging Face task head that a KerasHub task computes the same way.

    PEFT's `modules_to_save` trains such heads in full; their weights load
    onto the KerasHub task's layers.

    Args:
        task: The KerasHub task class name, such as `"BertTextClassifier"`.
        hf_model: The Hugging Face task class, such as
            `"BertForSequenceClassification"`.
        model_prefix: The prefix of the base model's modules in that class,
            such as `"bert."`.
        modules_to_save: The names PEFT's `modules_to_save` gives the
            head's modules, such as `("classifier",)`.
        layers: Tuples `(torch Linear module name, KerasHub layer path)`
            for the head's linear layers, names relative to the task models;
            each Keras kernel is the torch weight transposed and each bias
            the torch bias.
    """

    task: str
    hf_model: str
    model_prefix: str
    modules_to_save: str
    layers: tuple


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """The module-name mapping of one KerasHub architecture.

    Args:
        backbone: The KerasHub backbone class name, such as `"BertBackbone"`.
        hf_models: The Hugging Face base model class, for messages.
        model_prefixes: Prefixes the Hugging Face module names may carry,
            such as `"bert."` in a `BertForSequenceClassification` or
            `"model."` in a `LlamaForCausalLM`.
        linear: The `LinearMap`s.
        refused: The `Refusal`s.
        heads: The `TaskHead`s.
        fused: The `FusedMap`s.
    """

    backbone: str
    hf_models: str
    model_prefixes: tuple
    linear: tuple
    refused: tuple = ()
    heads: tuple = ()
    fused: tuple = ()

    def find_fused(self, hf_module):
        """The KerasHub paths of a fused module's parts, or `None`.

        Example:

        >>> GPT2.find_fused("transformer.h.1.attn.c_attn")[0]
        'transformer_layer_1/self_attention/query'
        """
        for prefix in self.model_prefixes:
            if not hf_module.startswith(prefix):
                continue
            for entry in self.fused:
                paths = entry.keras_paths(hf_module[len(prefix) :])
                if paths is not None:
                    return paths
        return None

    def hf_fused_module(self, keras_paths, model_prefix=""):
        """The fused module name of its parts' KerasHub paths, or `None`.

        Example:

        >>> GPT2.hf_fused_module([f"transformer_layer_0/self_attention/{n}"
        ...                       for n in ("query", "key", "value")])
        'h.0.attn.c_attn'
        """
        for entry in self.fused:
            name = entry.hf_name(keras_paths)
            if name is not None:
                return model_prefix + name
        return None

    def layouts(self):
        """The layouts of this architecture's mapped modules."""
        return {entry.layout for entry in self.linear + self.fused}

    def find(self, hf_module):
        """The `LinearMap` and KerasHub path of a module name, or a refusal.

        Args:
            hf_module: A module name of PEFT's file, possibly prefixed.

        Returns:
            A tuple `(keras_path, None)` when the module maps, `(None,
            reason)` when it is refused, `(None, None)` when unknown.

        Example:

        >>> BERT.find("bert.encoder.layer.3.attention.self.query")
        ('transformer_layer_3/self_attention_layer/query', None)
        """
        refusal = None
        for prefix in self.model_prefixes:
            if not hf_module.startswith(prefix):
                continue
            rest = hf_module[len(prefix) :]
            for entry in self.linear:
                for name in entry.hf_names():
                    numbers = _match(name, rest)
                    if numbers is not None:
                        return _fill(entry.keras, numbers), None
            for entry in self.refused:
                if refusal is None and entry.matches(rest):
                    refusal = entry.reason
        return None, refusal

    def keras_path(self, hf_module):
        """The KerasHub layer path of a Hugging Face module name, or `None`.

        Example:

        >>> DINOV2.keras_path("encoder.layer.3.attention.attention.query")
        'encoder/layers_3/attention/attention/query'
        """
        return self.find(hf_module)[0]

    def hf_module(self, keras_path, naming, model_prefix=""):
        """The Hugging Face module name of a KerasHub layer path, or `None`.

        Example:

        >>> VIT.hf_module("vit_encoder/transformer_block_1/mha/query",
        ...               "transformers5", "vit.")
        'vit.layers.0.attention.q_proj'
        """
        for entry in self.linear:
            numbers = _match(entry.keras, keras_path)
            if numbers is not None:
                return model_prefix + _fill(entry.hf_name(naming), numbers)
        return None

    def hf_templates(self):
        """Every Hugging Face module template, for error messages."""
        return sorted({name for entry in self.linear for name in entry.hf_names()})

    def head(self, task_class_name):
        """The `TaskHead` of a KerasHub task class name, or `None`."""
        for head in self.heads:
            if head.task == task_class_name:
                return head
        return None


def _block(hf, keras, names, layout="transposed", legacy=None):
    """`LinearMap`s for `(hf suffix, keras suffix[, legacy suffix])`s."""
    maps = []
    for entry in names:
        hf_suffix, keras_suffix = entry[0], entry[1]
        legacy_name = None
        if legacy is not None:
            legacy_name = f"{legacy}.{entry[2] if len(entry) > 2 else hf_suffix}"
        maps.append(
            LinearMap(
                f"{hf}.{hf_suffix}",
                f"{keras}/{keras_suffix}",
                entry[3] if len(entry) > 3 else layout,
                legacy_name,
            )
        )
    return tuple(maps)


_LM_HEAD = Refusal(
    "lm_head",
    "computes logits with the token embedding's reverse projection "
    "(ReversibleEmbedding), not a Dense or EinsumDense layer",
)

# BERT, RoBERTa and XLM-RoBERTa: KerasHub's TransformerEncoder block.
_BERT_BLOCK = _block(
    "encoder.layer.{i}",
    "transformer_layer_{i}",
    (
        ("attention.self.query", "self_attention_layer/query", None, "heads"),
        ("attention.self.key", "self_attention_layer/key", None, "heads"),
        ("attention.self.value", "self_attention_layer/value", None, "heads"),
        (
            "attention.output.dense",
            "self_attention_layer/attention_output",
            None,
            "heads",
        ),
        ("intermediate.dense", "feedforward_intermediate_dense"),
        ("output.dense", "feedforward_output_dense"),
    ),
)


def _text_classifier(task, hf_model, prefix):
    return TaskHead(
        task, hf_model, prefix, ("classifier",), (("classifier", "logits"),)
    )


def _roberta_classifier(task, hf_model):
    # RobertaClassificationHead: dense (tanh) then out_proj, on token 0.
    return TaskHead(
        task,
        hf_model,
        "roberta.",
        ("classifier",),
        (
            ("classifier.dense", "pooled_dense"),
            ("classifier.out_proj", "logits"),
        ),
    )


BERT = ArchitectureSpec(
    backbone="BertBackbone",
    hf_models="BertModel",
    model_prefixes=("", "bert."),
    linear=_BERT_BLOCK + (LinearMap("pooler.dense", "pooled_dense"),),
    refused=(Refusal("cls.*", "has no masked-LM or next-sentence head"),),
    heads=(
        _text_classifier(
            "BertTextClassifier", "BertForSequenceClassification", "bert."
        ),
    ),
)

_NO_POOLER = Refusal(
    "pooler.dense",
    "has no pooler in this backbone: the text classifier's pooled_dense is "
    "RobertaClassificationHead's `classifier.dense`",
)

ROBERTA = ArchitectureSpec(
    backbone="RobertaBackbone",
    hf_models="RobertaModel",
    model_prefixes=("", "roberta."),
    linear=_BERT_BLOCK,
    refused=(_NO_POOLER, Refusal("lm_head.*", "has no masked-LM head here")),
    heads=(
        _roberta_classifier(
            "RobertaTextClassifier", "RobertaForSequenceClassification"
        ),
    ),
)

XLM_ROBERTA = ArchitectureSpec(
    backbone="XLMRobertaBackbone",
    hf_models="XLMRobertaModel",
    model_prefixes=("", "roberta."),
    linear=_BERT_BLOCK,
    refused=(_NO_POOLER, Refusal("lm_head.*", "has no masked-LM head here")),
    heads=(
        _roberta_classifier(
            "XLMRobertaTextClassifier", "XLMRobertaForSequenceClassification"
        ),
    ),
)

DISTILBERT = ArchitectureSpec(
    backbone="DistilBertBackbone",
    hf_models="DistilBertModel",
    model_prefixes=("", "distilbert."),
    linear=_block(
        "transformer.layer.{i}",
        "transformer_layer_{i}",
        (
            ("attention.q_lin", "self_attention_layer/query", None, "heads"),
            ("attention.k_lin", "self_attention_layer/key", None, "heads"),
            ("attention.v_lin", "self_attention_layer/value", None, "heads"),
            (
                "attention.out_lin",
                "self_attention_layer/attention_output",
                None,
                "heads",
            ),
            ("ffn.lin1", "feedforward_intermediate_dense"),
            ("ffn.lin2", "feedforward_output_dense"),
        ),
    ),
    refused=(Refusal("vocab_*", "has no masked-LM head here"),),
    heads=(
        TaskHead(
            "DistilBertTextClassifier",
            "DistilBertForSequenceClassification",
            "distilbert.",
            ("pre_classifier", "classifier"),
            (("pre_classifier", "pooled_dense"), ("classifier", "logits")),
        ),
    ),
)

ALBERT = ArchitectureSpec(
    backbone="AlbertBackbone",
    hf_models="AlbertModel",
    model_prefixes=("", "albert."),
    linear=(
        LinearMap("encoder.embedding_hidden_mapping_in", "embedding_projection"),
        *_block(
            "encoder.albert_layer_groups.{g}.albert_layers.{j}",
            "group_{g}_inner_layer_{j}",
            (
                ("attention.query", "self_attention_layer/query", None, "heads"),
                ("attention.key", "self_attention_layer/key", None, "heads"),
                ("attention.value", "self_attention_layer/value", None, "heads"),
                (
                    "attention.dense",
                    "self_attention_layer/attention_output",
                    None,
                    "heads",
                ),
                ("ffn", "feedforward_intermediate_dense"),
                ("ffn_output", "feedforward_output_dense"),
            ),
        ),
        LinearMap("pooler", "pooled_dense"),
    ),
    refused=(
        Refusal("predictions.*", "has no masked-LM head here"),
        Refusal("sop_classifier.*", "has no sentence-order head"),
    ),
    heads=(
        _text_classifier(
            "AlbertTextClassifier", "AlbertForSequenceClassification", "albert."
        ),
    ),
)

GPT2 = ArchitectureSpec(
    backbone="GPT2Backbone",
    hf_models="GPT2Model",
    model_prefixes=("", "transformer."),
    linear=_block(
        "h.{i}",
        "transformer_layer_{i}",
        (
            ("attn.c_proj", "self_attention/attention_output"),
            ("mlp.c_fc", "feedforward_intermediate_dense"),
            ("mlp.c_proj", "feedforward_output_dense"),
        ),
        layout="conv1d",
    ),
    refused=(_LM_HEAD,),
    # The causal LM's head is the tied embedding: no layer of its own, but
    # its modules carry GPT2LMHeadModel's prefix.
    heads=(TaskHead("GPT2CausalLM", "GPT2LMHeadModel", "transformer.", (), ()),),
    # KerasHub's converter splits c_attn's (hidden, 3 * hidden) weight by
    # columns into query, key and value, in that order.
    fused=(
        FusedMap(
            "h.{i}.attn.c_attn",
            tuple(
                f"transformer_layer_{{i}}/self_attention/{part}"
                for part in ("query", "key", "value")
            ),
            layout="conv1d",
        ),
    ),
)

# Llama 3, Mistral, Qwen 2 and Qwen 3 share their converters' layer names.
_LLAMA_ATTENTION = _block(
    "layers.{i}.self_attn",
    "transformer_layer_{i}/self_attention",
    (
        ("q_proj", "query", None, "heads"),
        ("k_proj", "key", None, "heads"),
        ("v_proj", "value", None, "heads"),
        ("o_proj", "attention_output", None, "heads"),
    ),
)
_LLAMA_MLP = _block(
    "layers.{i}.mlp",
    "transformer_layer_{i}",
    (
        ("gate_proj", "feedforward_gate_dense"),
        ("up_proj", "feedforward_intermediate_dense"),
        ("down_proj", "feedforward_output_dense"),
    ),
)


def _llama_like(backbone, hf_models, linear=_LLAMA_ATTENTION + _LLAMA_MLP, extra=()):
    return ArchitectureSpec(
        backbone=backbone,
        hf_models=hf_models,
        model_prefixes=("", "model."),
        linear=linear,
        refused=(_LM_HEAD, *extra),
    )


LLAMA3 = _llama_like("Llama3Backbone", "LlamaModel")
MISTRAL = _llama_like("MistralBackbone", "MistralModel")
QWEN = _llama_like("QwenBackbone", "Qwen2Model")
QWEN3 = _llama_like("Qwen3Backbone", "Qwen3Model")
MIXTRAL = _llama_like(
    "MixtralBackbone",
    "MixtralModel",
    linear=_LLAMA_ATTENTION,
    extra=(
        Refusal(
            "layers.{i}.mlp.experts*",
            "keeps every expert's weights in one batched tensor "
            "(expert_bank), not one Dense layer per expert",
        ),
        Refusal(
            "layers.{i}.block_sparse_moe.experts*",
            "keeps every expert's weights in one batched tensor "
            "(expert_bank), not one Dense layer per expert",
        ),
        Refusal(
            "layers.{i}.block_sparse_moe.gate",
            "has this router as sparse_feedforward_gate_dense, but "
            "transformers 5's router is not a torch Linear, so keras_pvera "
            "does not map it",
        ),
    ),
)

# Gemma (1 and 2) and Gemma 3: per-head kernels (heads, hidden, head_dim).
_GEMMA_LINEAR = _block(
    "layers.{i}",
    "decoder_block_{i}",
    (
        ("self_attn.q_proj", "attention/query", None, "heads"),
        ("self_attn.k_proj", "attention/key", None, "heads"),
        ("self_attn.v_proj", "attention/value", None, "heads"),
        ("self_attn.o_proj", "attention/attention_output", None, "heads"),
        ("mlp.gate_proj", "ffw_gating"),
        ("mlp.up_proj", "ffw_gating_2"),
        ("mlp.down_proj", "ffw_linear"),
    ),
)
GEMMA = _llama_like("GemmaBackbone", "GemmaModel / Gemma2Model", _GEMMA_LINEAR)
GEMMA3 = _llama_like(
    "Gemma3Backbone",
    "Gemma3TextModel",
    _GEMMA_LINEAR,
    extra=(
        Refusal(
            "vision_tower*",
            "converts the vision tower, but keras_pvera maps Gemma 3's text model only",
        ),
    ),
)

# ViT and DeiT: transformers 5 `layers.{i}` modules, older versions' (and
# the checkpoints') `encoder.layer.{i}`; KerasHub numbers blocks from 1.
_VIT_LIKE_NAMES = (
    ("attention.q_proj", "mha/query", "attention.attention.query", "heads"),
    ("attention.k_proj", "mha/key", "attention.attention.key", "heads"),
    ("attention.v_proj", "mha/value", "attention.attention.value", "heads"),
    ("attention.o_proj", "mha/attention_output", "attention.output.dense", "heads"),
)


def _vit_like(name, keras_encoder, fc1, fc2, heads=()):
    return ArchitectureSpec(
        backbone=f"{name}Backbone",
        hf_models=f"{name}Model",
        model_prefixes=("", f"{name.lower()}."),
        linear=_block(
            "layers.{i}",
            f"{keras_encoder}/transformer_block_{{i+1}}",
            _VIT_LIKE_NAMES
            + (
                ("mlp.fc1", fc1, "intermediate.dense"),
                ("mlp.fc2", fc2, "output.dense"),
            ),
            legacy="encoder.layer.{i}",
        ),
        heads=heads,
    )


VIT = _vit_like(
    "ViT",
    "vit_encoder",
    "mlp/dense_1",
    "mlp/dense_2",
    heads=(
        TaskHead(
            "ViTImageClassifier",
            "ViTForImageClassification",
            "vit.",
            ("classifier",),
            (("classifier", "predictions"),),
        ),
    ),
)
DEIT = _vit_like("DeiT", "deit_encoder", "mlp/dense", "output_layer/output")

_DINOV2_MLP = (
    LinearMap("encoder.layer.{i}.mlp.fc1", "encoder/layers_{i}/mlp/fc1"),
    LinearMap("encoder.layer.{i}.mlp.fc2", "encoder/layers_{i}/mlp/fc2"),
)

DINOV2 = ArchitectureSpec(
    backbone="DINOV2Backbone",
    hf_models="Dinov2Model",
    model_prefixes=("", "dinov2."),
    linear=_block(
        "encoder.layer.{i}",
        "encoder/layers_{i}/attention/attention",
        (
            ("attention.q_proj", "query", "attention.attention.query", "heads"),
            ("attention.k_proj", "key", "attention.attention.key", "heads"),
            ("attention.v_proj", "value", "attention.attention.value", "heads"),
            (
                "attention.o_proj",
                "attention_output",
                "attention.output.dense",
                "heads",
            ),
        ),
        legacy="encoder.layer.{i}",
    )
    + _DINOV2_MLP,
)

DINOV3 = ArchitectureSpec(
    backbone="DINOV3Backbone",
    hf_models="DINOv3ViTModel",
    model_prefixes=("",),
    linear=_block(
        "model.layer.{i}",
        "encoder/layers_{i}",
        (
            ("attention.q_proj", "attention/q_proj"),
            ("attention.k_proj", "attention/k_proj"),
            ("attention.v_proj", "attention/v_proj"),
            ("attention.o_proj", "attention/o_proj"),
            ("mlp.gate_proj", "mlp/gate_proj"),
            ("mlp.up_proj", "mlp/up_proj"),
            ("mlp.down_proj", "mlp/down_proj"),
        ),
        legacy="layer.{i}",
    ),
)

_BART_ATTENTION = (
    ("q_proj", "query", None, "heads"),
    ("k_proj", "key", None, "heads"),
    ("v_proj", "value", None, "heads"),
    ("out_proj", "attention_output", None, "heads"),
)
_BART_MLP = (
    ("fc1", "feedforward_intermediate_dense"),
    ("fc2", "feedforward_output_dense"),
)

BART = ArchitectureSpec(
    backbone="BartBackbone",
    hf_models="BartModel",
    model_prefixes=("", "model."),
    linear=_block(
        "encoder.layers.{i}.self_attn",
        "transformer_encoder_layer_{i}/self_attention_layer",
        _BART_ATTENTION,
    )
    + _block("encoder.layers.{i}", "transformer_encoder_layer_{i}", _BART_MLP)
    + _block(
        "decoder.layers.{i}.self_attn",
        "transformer_decoder_layer_{i}/self_attention",
        _BART_ATTENTION,
    )
    + _block(
        "decoder.layers.{i}.encoder_attn",
        "transformer_decoder_layer_{i}/cross_attention",
        _BART_ATTENTION,
    )
    + _block("decoder.layers.{i}", "transformer_decoder_layer_{i}", _BART_MLP),
    refused=(_LM_HEAD,),
)

SPECS = {
    spec.backbone: spec
    for spec in (
        BERT,
        ROBERTA,
        XLM_ROBERTA,
        DISTILBERT,
        ALBERT,
        GPT2,
        LLAMA3,
        MISTRAL,
        MIXTRAL,
        QWEN,
        QWEN3,
        GEMMA,
        GEMMA3,
        VIT,
        DEIT,
        DINOV2,
        DINOV3,
        BART,
    )
}


def find_spec(model):
    """Finds the supported KerasHub backbone in a model and its spec.

    Args:
        model: A KerasHub backbone, or a model that holds one (a task model).

    Returns:
        A tuple `(spec, path_prefix)`: the backbone's `ArchitectureSpec`,
        and the backbone's layer path followed by `/` (`""` for the backbone
        itself), to put in front of the spec's KerasHub paths.

    Raises:
        ValueError: If the model holds no backbone with a spec.

    Example:

    >>> import keras_hub
    >>> bert = keras_hub.models.BertBackbone(
    ...     vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=8)
    >>> spec, prefix = find_spec(bert)
    >>> spec.backbone, prefix
    ('BertBackbone', '')
    """
    candidates = [("", model)] + list(layer_walk.iter_layers(model))
    for path, layer in candidates:
        for cls in type(layer).__mro__:
            if cls.__name__ in SPECS and cls.__module__.startswith("keras_hub"):
                return SPECS[cls.__name__], f"{path}/" if path else ""
    raise ValueError(
        f"PEFT interoperability has no module-name table for model "
        f"{model.name!r} of type {type(model).__name__}. Supported KerasHub "
        f"backbones: {sorted(SPECS)}."
    )


def kernel_matrix(kernel, layout, equation=None):
    """A KerasHub kernel as the `(in, out)` matrix of its linear map.

    Args:
        kernel: The kernel as a NumPy array.
        layout: One of `LAYOUTS` (documentation: every layout reads the same
            way).
        equation: The `EinsumDense` equation, or `None` for a `Dense`.

    Returns:
        A 2D NumPy array: the kernel's contracted axes flattened to rows and
        its output axes to columns, each row-major in kernel order.

    Raises:
        ValueError: For an unknown layout.

    Example:

    >>> import numpy as np
    >>> kernel = np.arange(24.0).reshape(2, 3, 4)  # (heads, hidden, head_dim)
    >>> kernel_matrix(kernel, "heads", "btd,ndh->btnh").shape
    (3, 8)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}. Received: {layout!r}")
    if equation is None:
        return np.asarray(kernel)
    linear = LinearEquation(equation, kernel.shape)
    # to_kernel_order maps (in dims..., out dims...) axes to kernel axes.
    order = [linear.to_kernel_order.index(axis) for axis in range(kernel.ndim)]
    matrix = np.transpose(kernel, order)
    return matrix.reshape(math.prod(linear.in_dims), math.prod(linear.out_dims))


def default_naming():
    """The module naming of the installed transformers (read, not imported).

    Returns:
        `"legacy"` if a transformers older than 5 is installed, else
        `"transformers5"`.
    """
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "transformers5"
    major = re.match(r"\d+", version)
    return "legacy" if major and int(major.group()) < 5 else "transformers5"
