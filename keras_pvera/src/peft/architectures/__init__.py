"""keras_pvera's PEFT module-name tables: one `ArchitectureSpec` per backbone.

Data only, one module per family; the schema and its matching are in
`peft/architecture_spec.py`, finding a model's table in
`peft/module_names.py`. To support an architecture, write its spec from its
KerasHub converter in the family's module (or a new one) and list it here.
"""

from keras_pvera.src.peft.architectures.bart import BART
from keras_pvera.src.peft.architectures.bert import ALBERT
from keras_pvera.src.peft.architectures.bert import BERT
from keras_pvera.src.peft.architectures.bert import DISTILBERT
from keras_pvera.src.peft.architectures.bert import ROBERTA
from keras_pvera.src.peft.architectures.bert import XLM_ROBERTA
from keras_pvera.src.peft.architectures.gemma import GEMMA
from keras_pvera.src.peft.architectures.gemma import GEMMA3
from keras_pvera.src.peft.architectures.gpt2 import GPT2
from keras_pvera.src.peft.architectures.llama import LLAMA3
from keras_pvera.src.peft.architectures.llama import MISTRAL
from keras_pvera.src.peft.architectures.llama import MIXTRAL
from keras_pvera.src.peft.architectures.llama import QWEN
from keras_pvera.src.peft.architectures.llama import QWEN3
from keras_pvera.src.peft.architectures.vision import DEIT
from keras_pvera.src.peft.architectures.vision import DINOV2
from keras_pvera.src.peft.architectures.vision import DINOV3
from keras_pvera.src.peft.architectures.vision import VIT

# The tables by KerasHub backbone class name.
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
