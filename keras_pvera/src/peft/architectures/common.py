"""What several architecture tables share: the tied LM head, decoder specs."""

from keras_pvera.src.peft.architecture_spec import ArchitectureSpec
from keras_pvera.src.peft.architecture_spec import Refusal

LM_HEAD = Refusal(
    "lm_head",
    "computes logits with the token embedding's reverse projection "
    "(ReversibleEmbedding), not a Dense or EinsumDense layer",
)


def decoder_spec(backbone, hf_models, linear, extra=()):
    """The spec of a decoder-only model whose blocks sit in `model.layers`.

    Its causal LM's `lm_head` is the tied embedding (refused), and its
    modules may carry the `model.` prefix of `<Name>ForCausalLM`.
    """
    return ArchitectureSpec(
        backbone=backbone,
        hf_models=hf_models,
        model_prefixes=("", "model."),
        linear=linear,
        refused=(LM_HEAD, *extra),
    )
