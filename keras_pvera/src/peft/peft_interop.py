"""Reading and writing Hugging Face PEFT PVeRA adapters.

A PEFT adapter is a folder with `adapter_config.json` (`peft_type: "PVERA"`,
`r`, `projection_prng_key`, `save_projection`, `d_initial`, `pvera_dropout`,
`sample_at_inference`, ...) and `adapter_model.safetensors`, holding per
adapted module `base_model.model.<module>.pvera_lambda_d` `(2r,)` and
`...pvera_lambda_b` `(out,)`, and, when `save_projection` is true, the shared
`base_model.pvera_A` `(2r, in_max)` and `base_model.pvera_B` `(out_max, r)`.
The config's fields map to `PVeRAConfig` settings through one table
(`peft_config.py`).

The adapter applies to the KerasHub equivalent of PEFT's base model: module
names map to KerasHub layer paths through keras_pvera's table of them. PyTorch's
`Linear` weight is `(out, in)`; KerasHub's converters reshape it row-major
into the kernel's output axes (`(hidden, heads, head_dim)` for a query), so
PEFT's `in` and `out` orderings are keras_pvera's and the vectors and
projections carry over unchanged. PEFT has no output scale: `alpha` is 1 on
reading, and is folded into `lambda_b` on writing.

Reading and writing use safetensors with NumPy only. Files written with
`save_projection=False` hold no projections: PEFT regenerates them with
torch's random generator, which only torch itself reproduces, so reading such
a file needs torch and refuses without it.
"""

import importlib
import os
import re

import keras
import numpy as np

from keras_pvera.src.layers.linear_map import LINEAR_LAYERS
from keras_pvera.src.layers.linear_map import linear_equation_of
from keras_pvera.src.models.pvera_model import PVeRAModel
from keras_pvera.src.peft.module_names import find_spec
from keras_pvera.src.peft.module_names import task_head
from keras_pvera.src.peft.peft_config import CONFIG_FILE
from keras_pvera.src.peft.peft_config import WEIGHTS_FILE
from keras_pvera.src.peft.peft_config import pvera_fields
from keras_pvera.src.peft.peft_config import read_peft_config
from keras_pvera.src.peft.peft_target import peft_target
from keras_pvera.src.peft.peft_target import write_peft_folder
from keras_pvera.src.saving import safetensors_io
from keras_pvera.src.saving.adapter_state import AdapterState
from keras_pvera.src.saving.adapter_state import restore_adapter
from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.surgery.layer_selection import adaptable_layers

_LAMBDA_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\.pvera_lambda_(?P<kind>[db])"
)
_SAVED_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<kind>weight|bias)")
_PROJECTION_KEYS = ("base_model.pvera_A", "base_model.pvera_B")


def load_peft_adapter(model, path, adapter=None, is_trainable=False):
    """Loads a PEFT PVeRA adapter folder onto a KerasHub model.

    Applies PVeRA to the KerasHub layers that match the adapter's modules
    and sets PEFT's vectors and projections, so the Keras model's mean
    predictions equal PEFT's eval predictions. The result has `alpha=1`,
    `seed=projection_prng_key` and `save_projection=True` (the projections
    come from PEFT, not from keras_pvera's seed).

    Modules of PEFT's `modules_to_save` (a task head trained in full) load
    onto the layers of a KerasHub task that computes the same head (see
    keras_pvera's table of PEFT module names), which then train in full too.

    Args:
        model: The KerasHub equivalent of PEFT's base model (for example
            `keras_hub.models.DINOV2Backbone.from_preset(<hf dir>)`, or a
            `BertTextClassifier` for a `BertForSequenceClassification`), not
            adapted yet.
        path: The adapter folder (`adapter_config.json` and
            `adapter_model.safetensors`).
        adapter: The adapter's name. PEFT saves a model's non-default
            adapters in sub-folders named after them: when `path/<adapter>`
            holds an adapter, it is read from there. On a `PVeRAModel`, the
            adapter is added under this name (PEFT's
            `load_adapter(path, adapter_name)`); `None` means `"default"`.
        is_trainable: PEFT's `is_trainable`, with PEFT's default `False`:
            an adapter loaded for inference only, whose vectors (and layers
            trained in full) do not train: the returned model has
            `trainable=False` (set `model.trainable = True`, or load with
            `is_trainable=True`, to train it). Applies when the loaded
            adapter is the active one; another adapter does not train
            until made active anyway.

    Returns:
        The adapted `PVeRAModel`.

    Raises:
        FileNotFoundError: If a file of the folder is missing.
        ValueError: For a model adapted outside a `PVeRAModel`, of an
            architecture without a module-name table, a config that is not
            PVeRA's or trains biases (`bias`), an unknown or refused module
            (the message says why), `modules_to_save` on a model that is not
            a KerasHub task with the same head, a tensor of the wrong shape,
            a truncated file. The model is then unchanged.
        ImportError: For an adapter saved without projections when torch is
            not importable.

    Example:

    A folder written by `save_peft_adapter` (or by PEFT from the Hugging
    Face `BertModel` of the same checkpoint), loaded on a fresh KerasHub
    BERT:

    >>> import os, tempfile
    >>> import keras, keras_hub, keras_pvera
    >>> def bert():
    ...     keras.utils.set_random_seed(0)
    ...     return keras_hub.models.BertBackbone(
    ...         vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...         intermediate_dim=16, max_sequence_length=8)
    >>> folder = tempfile.mkdtemp()
    >>> keras_pvera.save_peft_adapter(keras_pvera.apply(bert(), rank=4), folder)
    >>> model = keras_pvera.load_peft_adapter(bert(), folder)
    >>> model.pvera_config.rank, len(model.adapted_layers)  # query and value
    (4, 2)

    As PEFT's `from_pretrained`, it loads for inference unless told otherwise:

    >>> model.trainable, len(model.trainable_weights)
    (False, 0)
    >>> model = keras_pvera.load_peft_adapter(bert(), folder, is_trainable=True)
    >>> len(model.trainable_weights)  # lambda_d and lambda_b of both layers
    4
    """
    if not isinstance(is_trainable, bool):
        raise ValueError(
            f"`is_trainable` must be True or False. Received: "
            f"is_trainable={is_trainable!r}"
        )
    adapter = "default" if adapter is None else adapter
    if os.path.isfile(os.path.join(path, adapter, CONFIG_FILE)):
        path = os.path.join(path, adapter)
    if not isinstance(model, PVeRAModel) and layer_walk.pvera_layers(model):
        raise ValueError(
            "load_peft_adapter adapts a base model or a PVeRAModel, but this "
            "model holds PVeRA layers outside one. Load the base model again "
            "(for example with `from_preset`) and pass it."
        )
    state = read_peft_adapter(model, path)
    adapted = restore_adapter(model, state, adapter)
    if adapted.active_adapter == adapter:
        adapted.trainable = is_trainable
    return adapted


def read_peft_adapter(model, path):
    """Reads a PEFT PVeRA adapter folder as the `AdapterState` of a model.

    Args:
        model: The KerasHub equivalent of PEFT's base model, or a
            `PVeRAModel` over it.
        path: The adapter folder.

    Returns:
        An `AdapterState` with the layers in model order, `alpha=1` and
        `save_projection=True` (the projections are PEFT's).

    Raises:
        As `load_peft_adapter`; the model is not changed.
    """
    base = model.base_model if isinstance(model, PVeRAModel) else model
    target = _KerasTarget(model.name, base)
    peft = read_peft_config(path)
    tensors, _ = safetensors_io.read_safetensors(os.path.join(path, WEIGHTS_FILE))
    modules, saved = _lambda_vectors(tensors, path, peft.modules_to_save)
    trainable = _head_weights(target, saved, peft.modules_to_save)
    found, groups = target.adapted(modules, peft.settings.rank)
    # Model order, whatever the file's order.
    order = {p: i for i, p in enumerate(target.layers)}
    paths = sorted(found, key=order.__getitem__)
    groups.sort(key=lambda group: order[group[0]])
    state = AdapterState(
        config=peft.settings.replace(save_projection=True, fused_groups=groups or None),
        layers={p: found[p][0] for p in paths},
        lambda_d={p: found[p][1] for p in paths},
        lambda_b={p: found[p][2] for p in paths},
        trainable=trainable,
    )
    state.projections = _projections(peft.settings, tensors, state, path)
    return state


class _KerasTarget:
    """The KerasHub side of a PEFT load: table, backbone prefix, layers.

    Args:
        name: The model's name, for messages.
        base: The KerasHub model (backbone or task).
    """

    def __init__(self, name, base):
        self.name = name
        self.base = base
        self.spec, self.prefix = find_spec(base)
        self.layers = {
            path: getattr(layer, "base_layer", layer)
            for path, layer in adaptable_layers(base)
        }

    def adapted(self, modules, rank):
        """Each PEFT module's KerasHub layers and vectors.

        Args:
            modules: `{module: {"d": lambda_d, "b": lambda_b}}`.
            rank: PEFT's `r`.

        Returns:
            A tuple of `{keras path: ((in, out), lambda_d, lambda_b)}` and
            the fused groups (lists of keras paths).
        """
        found, groups = {}, []
        for module, vectors in modules.items():
            parts = self.spec.find_fused(module)
            if parts is None:
                keras_path, sizes = self.linear_layer(module, vectors, rank)
                found[keras_path] = (sizes, vectors["d"], vectors["b"])
                continue
            # One PEFT adapter over a module KerasHub splits: a fused group.
            group = _fused_group(module, vectors, rank, parts, self.prefix, self.layers)
            for keras_path, (sizes, vector_b) in group.items():
                found[keras_path] = (sizes, vectors["d"], vector_b)
            groups.append(list(group))
        return found, groups

    def linear_layer(self, module, vectors, rank):
        """The KerasHub path and `(in, out)` of a module KerasHub keeps whole."""
        keras_path = self.prefix + self.keras_path(module)
        layer = self.layers.get(keras_path)
        if not isinstance(layer, LINEAR_LAYERS):
            raise ValueError(
                f"PEFT module {module!r} maps to KerasHub layer "
                f"{keras_path!r}, which model {self.name!r} "
                f"{'does not have' if layer is None else 'has as a '}"
                f"{'' if layer is None else type(layer).__name__}."
            )
        linear = linear_equation_of(layer)
        for kind, shape in (("d", (2 * rank,)), ("b", (linear.out_dim,))):
            if tuple(vectors[kind].shape) != shape:
                raise ValueError(
                    f"PEFT tensor 'base_model.model.{module}.pvera_lambda_"
                    f"{kind}' has shape {tuple(vectors[kind].shape)}; r={rank} "
                    f"and KerasHub layer {keras_path!r} "
                    f"({linear.in_dim} -> {linear.out_dim}) need {shape}."
                )
        return keras_path, (linear.in_dim, linear.out_dim)

    def keras_path(self, module):
        """The table's KerasHub path of a module, or why it has none."""
        keras_path, refusal = self.spec.find(module)
        if refusal is not None:
            raise ValueError(
                f"PEFT module {module!r} cannot be loaded: KerasHub's "
                f"{self.spec.backbone} {refusal}."
            )
        if keras_path is None:
            raise ValueError(
                f"PEFT module {module!r} has no KerasHub equivalent in the "
                f"{self.spec.backbone} table. Known modules: "
                f"{self.spec.hf_templates()} (optionally prefixed by "
                f"{[p for p in self.spec.model_prefixes if p]})."
            )
        return keras_path


def save_peft_adapter(
    model,
    path,
    *,
    adapter=None,
    save_projection=True,
    naming=None,
    module_prefix=None,
):
    """Writes an adapted KerasHub model's adapter as a PEFT adapter folder.

    PEFT's `PeftModel.from_pretrained(hf_model, path)` loads the folder onto
    the Hugging Face equivalent of the KerasHub model, and its eval outputs
    then equal the Keras model's mean outputs. `alpha` is folded into
    `lambda_b` (PEFT has no output scale); the KL weight is not written
    (PEFT has none). Each file is written atomically.

    Args:
        model: A `PVeRAModel` over a KerasHub backbone whose PEFT module
            names keras_pvera knows (see the docs' PEFT section), or over a
            KerasHub task holding one. Layers trained in full must be the task head's
            (written as PEFT's `modules_to_save`).
        path: The folder to write (created if needed).
        adapter: The adapter's name; `None` for the active one.
        save_projection: Whether to write `A` and `B`. `False` writes PEFT's
            `save_projection: false`, which makes PEFT regenerate them with
            torch's generator: allowed only when the model's projections are
            exactly those (checked with torch).
        naming: Module naming of the transformers version that will load the
            adapter: `"transformers5"` or `"legacy"` (older DINOv2 names);
            `None` picks the installed transformers' naming.
        module_prefix: Prefix of the Hugging Face module names, for task
            models such as `"dinov2."` in a `Dinov2ForImageClassification`
            or `"model."` in a `LlamaForCausalLM`; `""` for `BertModel` /
            `Dinov2Model`. `None` picks the task head's prefix for a KerasHub
            task with a mapped head (`"bert."` for a `BertTextClassifier`),
            else `""`.

    Raises:
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: For an architecture without a table, an adapted layer
            without a Hugging Face equivalent, layers trained in full, a bad
            `naming`, `save_projection=False` with projections PEFT would
            not regenerate, or an adapter with a `max_log_variance` (PEFT's
            PVeRA has no bound).
        ImportError: For `save_projection=False` without torch.

    Returns:
        None. The folder holds `adapter_config.json` and
        `adapter_model.safetensors`.

    Example:

    >>> import os, tempfile
    >>> import keras_hub, keras_pvera
    >>> bert = keras_hub.models.BertBackbone(
    ...     vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=8)
    >>> folder = tempfile.mkdtemp()
    >>> keras_pvera.save_peft_adapter(keras_pvera.apply(bert, rank=4), folder)
    >>> sorted(os.listdir(folder))
    ['adapter_config.json', 'adapter_model.safetensors']

    PEFT then loads it onto the Hugging Face model of the same checkpoint:
    `peft.PeftModel.from_pretrained(hf_bert_model, folder)`.
    """
    target = peft_target(model, adapter, naming, module_prefix, "PEFT")
    bound = target.state.config.max_log_variance
    if bound is not None:
        raise ValueError(
            f"Adapter {target.name!r} has max_log_variance={bound!r}, and PEFT's "
            "PVeRA has no bound on the log-variance: PEFT would sample it "
            "unbounded. Save it with `keras_pvera.save_adapter` instead (its "
            "file keeps the bound), or train an adapter without one for PEFT."
        )
    state = target.state
    tensors = {**target.head_tensors, **_vector_tensors(target)}
    if save_projection:
        tensors["base_model.pvera_A"] = np.asarray(state.projections[0], "float32")
        tensors["base_model.pvera_B"] = np.asarray(state.projections[1], "float32")
    else:
        (_, in_max), (out_max, _) = state.projection_shapes()
        state.require_seed_made(
            state.projections,
            "With save_projection=False PEFT regenerates the projections "
            "with torch from projection_prng_key",
            "Save with save_projection=True.",
            seed_made=torch_projections(state.config.seed, state.rank, in_max, out_max),
        )
    settings = state.config.replace(save_projection=bool(save_projection))
    config = {
        "peft_type": "PVERA",
        **pvera_fields(settings),
        **target.config_fields(),
    }
    write_peft_folder(path, tensors, config)


def _vector_tensors(target):
    """PEFT's `lambda_d` and `lambda_b` tensors, `alpha` folded into `lambda_b`."""
    state, tensors = target.state, {}
    for module, paths in target.modules:
        key = f"base_model.model.{module}.pvera_lambda_"
        # A fused group's layers share lambda_d; lambda_b runs over all parts.
        tensors[key + "d"] = np.asarray(state.lambda_d[paths[0]], "float32")
        tensors[key + "b"] = np.concatenate(
            [
                np.asarray(state.config.alpha * state.lambda_b[p], "float32")
                for p in paths
            ]
        )
    return tensors


def torch_projections(seed, rank, in_max, out_max):
    """PEFT's projections for a seed, made exactly as PEFT makes them.

    PEFT draws `A` `(2r, in_max)` then `B` `(out_max, r)` with
    `torch.nn.init.kaiming_uniform_` from one CPU `torch.Generator` seeded
    with `projection_prng_key`. Only torch reproduces its generator.

    Args:
        seed: PEFT's `projection_prng_key`.
        rank: PEFT's `r`.
        in_max: Largest input size among the adapted modules.
        out_max: Largest output size among the adapted modules.

    Returns:
        A tuple `(A, B)` of float32 NumPy arrays.

    Raises:
        ImportError: If torch is not importable.
    """
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        raise ImportError(
            "This PEFT adapter was saved with save_projection=False, so its "
            "projections must be regenerated with torch's random generator, "
            "and torch is not importable here. Install torch, or have the "
            "adapter saved with save_projection=True."
        ) from e
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.nn.init.kaiming_uniform_(
        torch.empty(2 * rank, in_max), generator=generator
    )
    b = torch.nn.init.kaiming_uniform_(torch.empty(out_max, rank), generator=generator)
    return a.numpy(), b.numpy()


def _lambda_vectors(tensors, path, modules_to_save):
    """PEFT's vectors and the tensors of its `modules_to_save`.

    Returns:
        A tuple of `{module: {"d": lambda_d, "b": lambda_b}}` and
        `{module: {"weight": array, "bias": array}}`.
    """
    modules, saved = {}, {}
    for key, array in tensors.items():
        if key in _PROJECTION_KEYS:
            continue
        match = _LAMBDA_KEY.fullmatch(key)
        if match is None:
            match = _SAVED_KEY.fullmatch(key)
            if match is not None and _is_saved_module(match["module"], modules_to_save):
                saved.setdefault(match["module"], {})[match["kind"]] = array
                continue
            raise ValueError(
                f"PEFT adapter {path!r} has tensor {key!r}, which is not a "
                "PVeRA vector or projection, nor a weight of a module of "
                f"modules_to_save={modules_to_save!r}."
            )
        modules.setdefault(match["module"], {})[match["kind"]] = array
    if not modules:
        raise ValueError(f"PEFT adapter {path!r} holds no PVeRA vectors.")
    for module, vectors in modules.items():
        for kind in ("d", "b"):
            if kind not in vectors:
                raise ValueError(
                    f"PEFT adapter {path!r} is missing tensor "
                    f"'base_model.model.{module}.pvera_lambda_{kind}'."
                )
    return modules, saved


def _fused_group(module, vectors, rank, parts, keras_prefix, layers):
    """`{keras path: ((in, out), lambda_b rows)}` for a fused PEFT module."""
    group, offset = {}, 0
    for part in parts:
        keras_path = keras_prefix + part
        layer = layers.get(keras_path)
        if not isinstance(layer, LINEAR_LAYERS):
            raise ValueError(
                f"PEFT module {module!r} maps to KerasHub layers "
                f"{[keras_prefix + p for p in parts]}, but the model has no "
                f"Dense/EinsumDense layer {keras_path!r}."
            )
        linear = linear_equation_of(layer)
        group[keras_path] = [(linear.in_dim, linear.out_dim), offset]
        offset += linear.out_dim
    shapes = {"d": (2 * rank,), "b": (offset,)}
    for kind, shape in shapes.items():
        if tuple(vectors[kind].shape) != shape:
            raise ValueError(
                f"PEFT tensor 'base_model.model.{module}.pvera_lambda_{kind}' "
                f"has shape {tuple(vectors[kind].shape)}; r={rank} and its "
                f"KerasHub parts {list(group)} ({offset} outputs in all) "
                f"need {shape}."
            )
    return {
        path: (sizes, np.array(vectors["b"][start : start + sizes[1]]))
        for path, (sizes, start) in group.items()
    }


def _is_saved_module(module, modules_to_save):
    return any(
        module == name or module.endswith("." + name) or module.startswith(name + ".")
        for name in modules_to_save or ()
    )


def _head_weights(target, saved, modules_to_save):
    """`{keras path: [kernel, bias]}` for PEFT's saved head modules."""
    if not saved:
        return {}
    head = task_head(target.base, target.spec)
    if head is None:
        raise ValueError(
            f"The PEFT adapter trains modules {sorted(saved)} in full "
            f"(modules_to_save={modules_to_save!r}), which load only "
            "onto a KerasHub task computing the same head. Model "
            f"{target.base.name!r} of type {type(target.base).__name__} is none "
            f"of {[h.task for h in target.spec.heads]}."
        )
    keras_paths = dict(head.layers)
    trainable = {}
    for module, arrays in saved.items():
        if module not in keras_paths:
            raise ValueError(
                f"PEFT saved module {module!r} (modules_to_save) is not a "
                f"layer of {head.hf_model}'s head that {head.task} computes "
                f"the same way: {sorted(keras_paths)}."
            )
        keras_path = keras_paths[module]
        layer = target.layers.get(keras_path)
        trainable[keras_path] = _head_layer_weights(
            module, arrays, layer, keras_path, head, target.base.name
        )
    return trainable


def _head_layer_weights(module, arrays, layer, keras_path, head, model_name):
    """`[kernel, bias]` of one head layer, from PEFT's `weight` and `bias`."""
    if not isinstance(layer, keras.layers.Dense):
        raise ValueError(
            f"PEFT saved module {module!r} maps to {head.task} layer "
            f"{keras_path!r}, which model {model_name!r} does not have "
            "as a Dense layer."
        )
    weight = arrays.get("weight")
    bias = arrays.get("bias")
    if weight is None or (bias is None) == layer.use_bias:
        raise ValueError(
            f"PEFT saved module {module!r} has tensors {sorted(arrays)}; "
            f"{head.task} layer {keras_path!r} needs 'weight'"
            f"{' and bias' if layer.use_bias else ' only'}."
        )
    shape = tuple(layer.kernel.shape)
    if weight.ndim != 2 or tuple(weight.shape[::-1]) != shape:
        raise ValueError(
            f"PEFT tensor 'base_model.model.{module}.weight' has shape "
            f"{tuple(weight.shape)}; {head.task} layer {keras_path!r} "
            f"(kernel {shape}) needs {shape[::-1]}. Build the task with "
            "the adapter's number of classes."
        )
    return [np.array(weight.T)] + ([np.asarray(bias)] if layer.use_bias else [])


def _projections(settings, tensors, state, path):
    """PEFT's `A` and `B`: the file's, or torch's when it holds none."""
    (rows_a, in_max), (out_max, rank) = state.projection_shapes()
    if not settings.save_projection:
        # PEFT regenerates them even when the file has some.
        return torch_projections(settings.seed, rank, in_max, out_max)
    for key in _PROJECTION_KEYS:
        if key not in tensors:
            raise ValueError(
                f"PEFT adapter {path!r} has save_projection=true but no tensor {key!r}."
            )
    a, b = tensors["base_model.pvera_A"], tensors["base_model.pvera_B"]
    if a.ndim != 2 or a.shape[0] != rows_a or a.shape[1] < in_max:
        raise ValueError(
            f"PEFT tensor 'base_model.pvera_A' has shape {tuple(a.shape)}; "
            f"r={rank} and the adapted layers need ({rows_a}, >= {in_max})."
        )
    if b.ndim != 2 or b.shape[1] != rank or b.shape[0] < out_max:
        raise ValueError(
            f"PEFT tensor 'base_model.pvera_B' has shape {tuple(b.shape)}; "
            f"r={rank} and the adapted layers need (>= {out_max}, {rank})."
        )
    # Layers only read the leading slices, so extra columns/rows are unused.
    return np.array(a[:, :in_max]), np.array(b[:out_max, :])
