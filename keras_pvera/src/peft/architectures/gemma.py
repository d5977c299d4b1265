"""Gemma (1 and 2) and Gemma 3's text model."""

from keras_pvera.src.peft.architecture_spec import Refusal
from keras_pvera.src.peft.architecture_spec import linear_block
from keras_pvera.src.peft.architectures.common import decoder_spec

# Gemma (1 and 2) and Gemma 3: per-head kernels (heads, hidden, head_dim).
_GEMMA_LINEAR = linear_block(
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
GEMMA = decoder_spec("GemmaBackbone", "GemmaModel / Gemma2Model", _GEMMA_LINEAR)
GEMMA3 = decoder_spec(
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
