"""GPT-2: `Conv1D` modules, and the fused `c_attn` KerasHub splits in three."""

from keras_pvera.src.peft.architecture_spec import ArchitectureSpec
from keras_pvera.src.peft.architecture_spec import FusedMap
from keras_pvera.src.peft.architecture_spec import TaskHead
from keras_pvera.src.peft.architecture_spec import linear_block
from keras_pvera.src.peft.architectures.common import LM_HEAD

GPT2 = ArchitectureSpec(
    backbone="GPT2Backbone",
    hf_models="GPT2Model",
    model_prefixes=("", "transformer."),
    linear=linear_block(
        "h.{i}",
        "transformer_layer_{i}",
        (
            ("attn.c_proj", "self_attention/attention_output"),
            ("mlp.c_fc", "feedforward_intermediate_dense"),
            ("mlp.c_proj", "feedforward_output_dense"),
        ),
        layout="conv1d",
    ),
    refused=(LM_HEAD,),
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
