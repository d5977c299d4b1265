"""Vision transformers: ViT, DeiT, DINOv2 and DINOv3."""

from keras_pvera.src.peft.architecture_spec import ArchitectureSpec
from keras_pvera.src.peft.architecture_spec import LinearMap
from keras_pvera.src.peft.architecture_spec import TaskHead
from keras_pvera.src.peft.architecture_spec import linear_block

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
        linear=linear_block(
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
    linear=linear_block(
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
    linear=linear_block(
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
