"""BERT's family: BERT, RoBERTa, XLM-RoBERTa, DistilBERT and ALBERT."""

from keras_pvera.src.peft.architecture_spec import ArchitectureSpec
from keras_pvera.src.peft.architecture_spec import LinearMap
from keras_pvera.src.peft.architecture_spec import Refusal
from keras_pvera.src.peft.architecture_spec import TaskHead
from keras_pvera.src.peft.architecture_spec import linear_block

# BERT, RoBERTa and XLM-RoBERTa: KerasHub's TransformerEncoder block.
_BERT_BLOCK = linear_block(
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
    linear=linear_block(
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
        *linear_block(
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
