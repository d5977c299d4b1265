"""The schema of keras_pvera's PEFT module-name tables, and their matching.

PEFT names an adapted layer by its PyTorch module path in the Hugging Face
model (`encoder.layer.0.attention.self.query`); keras_pvera by its layer path
in the KerasHub model (`transformer_layer_0/self_attention_layer/query`).
Each architecture whose transformers checkpoints KerasHub converts has one
`ArchitectureSpec` (the tables are data, in `peft/architectures/`), written
from its converter (`keras_hub/src/utils/transformers/convert_<name>.py`):
one `LinearMap` per linear module the converter ports into a `Dense` /
`EinsumDense` kernel, one `Refusal` per module PEFT can adapt that has no
KerasHub equivalent (with the reason), and one `TaskHead` per task head
PEFT's `modules_to_save` can carry. Names are templates: `{i}` stands for a
block number, `{i+1}` for that number plus one.

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
`LinearMap` holds both names (`NAMINGS`); reading accepts both.
"""

import dataclasses
import re

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

        >>> from keras_pvera.src.peft.architectures import GPT2
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

        >>> from keras_pvera.src.peft.architectures import GPT2
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

        >>> from keras_pvera.src.peft.architectures import BERT
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

        >>> from keras_pvera.src.peft.architectures import DINOV2
        >>> DINOV2.keras_path("encoder.layer.3.attention.attention.query")
        'encoder/layers_3/attention/attention/query'
        """
        return self.find(hf_module)[0]

    def hf_module(self, keras_path, naming, model_prefix=""):
        """The Hugging Face module name of a KerasHub layer path, or `None`.

        Example:

        >>> from keras_pvera.src.peft.architectures import VIT
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


def linear_block(hf, keras, names, layout="transposed", legacy=None):
    """`LinearMap`s of one block, from `(hf, keras[, legacy[, layout]])` suffixes.

    Args:
        hf: The block's module name template, such as `"encoder.layer.{i}"`.
        keras: The block's KerasHub path template.
        names: Tuples `(hf suffix, keras suffix)`, optionally followed by
            the legacy suffix (read only when `legacy` is given; absent, the
            same as `hf suffix`) and the layout (default: `layout`).
        layout: The layout of entries that name none.
        legacy: The block's legacy module name template, or `None` when the
            names did not change.

    Returns:
        A tuple of `LinearMap`s.

    Example:

    >>> linear_block("h.{i}", "layer_{i}", (("mlp.c_fc", "dense"),))[0].keras
    'layer_{i}/dense'
    """
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
