"""Which Hugging Face module is which KerasHub layer, per architecture.

PEFT names an adapted layer by its PyTorch module path in the Hugging Face
model (`encoder.layer.0.attention.self.query`); keras_pvera by its layer path
in the KerasHub model (`transformer_layer_0/self_attention_layer/query`).
Each supported KerasHub backbone has one `ModuleNameTable` here.

Module names depend on the transformers version: transformers 5 names
DINOv2's attention projections `attention.q_proj/k_proj/v_proj/o_proj`, older
versions `attention.attention.query/key/value` and `attention.output.dense`.
A table holds one list of names per naming; reading accepts every naming.
"""

import dataclasses
import importlib.metadata
import re

from keras_pvera import model_surgery

NAMINGS = ("transformers5", "legacy")


@dataclasses.dataclass(frozen=True)
class ModuleNameTable:
    """The module-name mapping of one KerasHub backbone.

    Args:
        backbone: The KerasHub backbone class name, such as `"BertBackbone"`.
        model_prefixes: Prefixes the Hugging Face module names may carry,
            such as `"bert."` in a `BertForSequenceClassification`.
        names: A dict from naming (`"transformers5"`, `"legacy"`) to a tuple
            of `(hf_module, keras_path)` templates, where `{i}` stands for a
            block number.
    """

    backbone: str
    model_prefixes: tuple
    names: dict

    def keras_path(self, hf_module):
        """The KerasHub layer path of a Hugging Face module name, or `None`.

        Example:

        >>> BERT.keras_path("encoder.layer.3.attention.self.query")
        'transformer_layer_3/self_attention_layer/query'
        """
        for prefix in self.model_prefixes:
            if not hf_module.startswith(prefix):
                continue
            rest = hf_module[len(prefix) :]
            for naming in NAMINGS:
                for hf_template, keras_template in self.names[naming]:
                    match = _template_pattern(hf_template).fullmatch(rest)
                    if match:
                        return keras_template.format(**match.groupdict())
        return None

    def hf_module(self, keras_path, naming, model_prefix=""):
        """The Hugging Face module name of a KerasHub layer path, or `None`.

        Example:

        >>> DINOV2.hf_module("encoder/layers_0/attention/attention/query",
        ...                  "transformers5")
        'encoder.layer.0.attention.q_proj'
        """
        for hf_template, keras_template in self.names[naming]:
            match = _template_pattern(keras_template).fullmatch(keras_path)
            if match:
                return model_prefix + hf_template.format(**match.groupdict())
        return None

    def hf_templates(self):
        """Every Hugging Face module template, for error messages."""
        return sorted({hf for names in self.names.values() for hf, _ in names})


def _template_pattern(template):
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_BERT_NAMES = (
    (
        "encoder.layer.{i}.attention.self.query",
        "transformer_layer_{i}/self_attention_layer/query",
    ),
    (
        "encoder.layer.{i}.attention.self.key",
        "transformer_layer_{i}/self_attention_layer/key",
    ),
    (
        "encoder.layer.{i}.attention.self.value",
        "transformer_layer_{i}/self_attention_layer/value",
    ),
    (
        "encoder.layer.{i}.attention.output.dense",
        "transformer_layer_{i}/self_attention_layer/attention_output",
    ),
    (
        "encoder.layer.{i}.intermediate.dense",
        "transformer_layer_{i}/feedforward_intermediate_dense",
    ),
    (
        "encoder.layer.{i}.output.dense",
        "transformer_layer_{i}/feedforward_output_dense",
    ),
    ("pooler.dense", "pooled_dense"),
)

BERT = ModuleNameTable(
    backbone="BertBackbone",
    model_prefixes=("", "bert."),
    names={"transformers5": _BERT_NAMES, "legacy": _BERT_NAMES},
)

_DINOV2_MLP_NAMES = (
    ("encoder.layer.{i}.mlp.fc1", "encoder/layers_{i}/mlp/fc1"),
    ("encoder.layer.{i}.mlp.fc2", "encoder/layers_{i}/mlp/fc2"),
)

DINOV2 = ModuleNameTable(
    backbone="DINOV2Backbone",
    model_prefixes=("", "dinov2."),
    names={
        "transformers5": (
            (
                "encoder.layer.{i}.attention.q_proj",
                "encoder/layers_{i}/attention/attention/query",
            ),
            (
                "encoder.layer.{i}.attention.k_proj",
                "encoder/layers_{i}/attention/attention/key",
            ),
            (
                "encoder.layer.{i}.attention.v_proj",
                "encoder/layers_{i}/attention/attention/value",
            ),
            (
                "encoder.layer.{i}.attention.o_proj",
                "encoder/layers_{i}/attention/attention/attention_output",
            ),
            *_DINOV2_MLP_NAMES,
        ),
        "legacy": (
            (
                "encoder.layer.{i}.attention.attention.query",
                "encoder/layers_{i}/attention/attention/query",
            ),
            (
                "encoder.layer.{i}.attention.attention.key",
                "encoder/layers_{i}/attention/attention/key",
            ),
            (
                "encoder.layer.{i}.attention.attention.value",
                "encoder/layers_{i}/attention/attention/value",
            ),
            (
                "encoder.layer.{i}.attention.output.dense",
                "encoder/layers_{i}/attention/attention/attention_output",
            ),
            *_DINOV2_MLP_NAMES,
        ),
    },
)

TABLES = {table.backbone: table for table in (BERT, DINOV2)}


def find_table(model):
    """Finds the supported KerasHub backbone in a model and its table.

    Args:
        model: A KerasHub backbone, or a model that holds one (a task model).

    Returns:
        A tuple `(table, path_prefix)`: the backbone's `ModuleNameTable`, and
        the backbone's layer path followed by `/` (`""` for the backbone
        itself), to put in front of the table's KerasHub paths.

    Raises:
        ValueError: If the model holds no backbone with a table.

    Example:

    >>> import keras_hub
    >>> bert = keras_hub.models.BertBackbone(
    ...     vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=8)
    >>> table, prefix = find_table(bert)
    >>> table.backbone, prefix
    ('BertBackbone', '')
    """
    candidates = [("", model)] + list(model_surgery.iter_layers(model))
    for path, layer in candidates:
        for cls in type(layer).__mro__:
            if cls.__name__ in TABLES and cls.__module__.startswith("keras_hub"):
                return TABLES[cls.__name__], f"{path}/" if path else ""
    raise ValueError(
        f"PEFT interoperability has no module-name table for model "
        f"{model.name!r} of type {type(model).__name__}. Supported KerasHub "
        f"backbones: {sorted(TABLES)}."
    )


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
