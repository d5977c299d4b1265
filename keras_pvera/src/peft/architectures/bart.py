"""BART: encoder, decoder self-attention and cross-attention blocks."""

from keras_pvera.src.peft.architecture_spec import ArchitectureSpec
from keras_pvera.src.peft.architecture_spec import linear_block
from keras_pvera.src.peft.architectures.common import LM_HEAD

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
    linear=linear_block(
        "encoder.layers.{i}.self_attn",
        "transformer_encoder_layer_{i}/self_attention_layer",
        _BART_ATTENTION,
    )
    + linear_block("encoder.layers.{i}", "transformer_encoder_layer_{i}", _BART_MLP)
    + linear_block(
        "decoder.layers.{i}.self_attn",
        "transformer_decoder_layer_{i}/self_attention",
        _BART_ATTENTION,
    )
    + linear_block(
        "decoder.layers.{i}.encoder_attn",
        "transformer_decoder_layer_{i}/cross_attention",
        _BART_ATTENTION,
    )
    + linear_block("decoder.layers.{i}", "transformer_decoder_layer_{i}", _BART_MLP),
    refused=(LM_HEAD,),
)
