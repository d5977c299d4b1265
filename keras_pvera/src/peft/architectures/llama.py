"""Llama 3, Mistral, Mixtral, Qwen 2 and Qwen 3."""

from keras_pvera.src.peft.architecture_spec import Refusal
from keras_pvera.src.peft.architecture_spec import linear_block
from keras_pvera.src.peft.architectures.common import decoder_spec

# Llama 3, Mistral, Qwen 2 and Qwen 3 share their converters' layer names.
_LLAMA_ATTENTION = linear_block(
    "layers.{i}.self_attn",
    "transformer_layer_{i}/self_attention",
    (
        ("q_proj", "query", None, "heads"),
        ("k_proj", "key", None, "heads"),
        ("v_proj", "value", None, "heads"),
        ("o_proj", "attention_output", None, "heads"),
    ),
)
_LLAMA_MLP = linear_block(
    "layers.{i}.mlp",
    "transformer_layer_{i}",
    (
        ("gate_proj", "feedforward_gate_dense"),
        ("up_proj", "feedforward_intermediate_dense"),
        ("down_proj", "feedforward_output_dense"),
    ),
)
_LLAMA_LINEAR = _LLAMA_ATTENTION + _LLAMA_MLP

LLAMA3 = decoder_spec("Llama3Backbone", "LlamaModel", _LLAMA_LINEAR)
MISTRAL = decoder_spec("MistralBackbone", "MistralModel", _LLAMA_LINEAR)
QWEN = decoder_spec("QwenBackbone", "Qwen2Model", _LLAMA_LINEAR)
QWEN3 = decoder_spec("Qwen3Backbone", "Qwen3Model", _LLAMA_LINEAR)
MIXTRAL = decoder_spec(
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
