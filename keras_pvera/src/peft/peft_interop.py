"""Reading and writing Hugging Face PEFT PVeRA adapters.

A PEFT adapter is a folder with `adapter_config.json` (`peft_type: "PVERA"`,
`r`, `projection_prng_key`, `save_projection`, `d_initial`, `pvera_dropout`,
`sample_at_inference`, ...) and `adapter_model.safetensors`, holding per
adapted module `base_model.model.<module>.pvera_lambda_d` `(2r,)` and
`...pvera_lambda_b` `(out,)`, and, when `save_projection` is true, the shared
`base_model.pvera_A` `(2r, in_max)` and `base_model.pvera_B` `(out_max, r)`.

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
import json
import os
import re

import keras
import numpy as np

from keras_pvera.src.layers.linear_map import LINEAR_LAYERS
from keras_pvera.src.layers.linear_map import linear_equation_of
from keras_pvera.src.layers.pvera_config import PVeRAConfig
from keras_pvera.src.models.pvera_model import PVeRAModel
from keras_pvera.src.peft.module_names import NAMINGS
from keras_pvera.src.peft.module_names import default_naming
from keras_pvera.src.peft.module_names import fill_template
from keras_pvera.src.peft.module_names import find_spec
from keras_pvera.src.peft.module_names import match_template
from keras_pvera.src.saving import safetensors_io
from keras_pvera.src.saving.adapter_state import AdapterState
from keras_pvera.src.saving.adapter_state import adapter_state_of
from keras_pvera.src.saving.adapter_state import check_uncalibrated
from keras_pvera.src.saving.adapter_state import restore_adapter
from keras_pvera.src.surgery import layer_walk
from keras_pvera.src.surgery.layer_selection import adaptable_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
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
    base = model.base_model if isinstance(model, PVeRAModel) else model
    if not isinstance(model, PVeRAModel) and layer_walk.pvera_layers(model):
        raise ValueError(
            "load_peft_adapter adapts a base model or a PVeRAModel, but this "
            "model holds PVeRA layers outside one. Load the base model again "
            "(for example with `from_preset`) and pass it."
        )
    spec, keras_prefix = find_spec(base)
    config = read_peft_config(path)
    tensors, _ = safetensors_io.read_safetensors(os.path.join(path, WEIGHTS_FILE))
    rank = config["r"]
    modules, saved = _lambda_vectors(tensors, path, config["modules_to_save"])
    layers = {
        path: getattr(layer, "base_layer", layer)
        for path, layer in adaptable_layers(base)
    }
    trainable = _head_weights(base, spec, saved, config, layers)
    state_layers, lambda_d, lambda_b, groups = {}, {}, {}, []
    for module, vectors in modules.items():
        parts = spec.find_fused(module)
        if parts is not None:
            # One PEFT adapter over a module KerasHub splits: a fused group.
            group = _fused_group(module, vectors, rank, parts, keras_prefix, layers)
            for keras_path, (sizes, vector_b) in group.items():
                state_layers[keras_path] = sizes
                lambda_d[keras_path] = vectors["d"]
                lambda_b[keras_path] = vector_b
            groups.append(list(group))
            continue
        keras_path, refusal = spec.find(module)
        if refusal is not None:
            raise ValueError(
                f"PEFT module {module!r} cannot be loaded: KerasHub's "
                f"{spec.backbone} {refusal}."
            )
        if keras_path is None:
            raise ValueError(
                f"PEFT module {module!r} has no KerasHub equivalent in the "
                f"{spec.backbone} table. Known modules: "
                f"{spec.hf_templates()} (optionally prefixed by "
                f"{[p for p in spec.model_prefixes if p]})."
            )
        keras_path = keras_prefix + keras_path
        layer = layers.get(keras_path)
        if not isinstance(layer, LINEAR_LAYERS):
            raise ValueError(
                f"PEFT module {module!r} maps to KerasHub layer "
                f"{keras_path!r}, which model {model.name!r} "
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
        state_layers[keras_path] = (linear.in_dim, linear.out_dim)
        lambda_d[keras_path] = vectors["d"]
        lambda_b[keras_path] = vectors["b"]
    # Model order, whatever the file's order.
    order = {p: i for i, p in enumerate(layers)}
    paths = sorted(state_layers, key=order.__getitem__)
    groups.sort(key=lambda group: order[group[0]])
    state = AdapterState(
        config=PVeRAConfig(
            rank=rank,
            seed=config["projection_prng_key"],
            d_initial=config["d_initial"],
            dropout=config["pvera_dropout"],
            sample_at_inference=config["sample_at_inference"],
            generator_seed=config["generator_seed"],
            fused_groups=groups or None,
        ),
        layers={p: state_layers[p] for p in paths},
        lambda_d={p: lambda_d[p] for p in paths},
        lambda_b={p: lambda_b[p] for p in paths},
        trainable=trainable,
    )
    state.projections = _projections(config, tensors, state, path)
    adapted = restore_adapter(model, state, adapter)
    if adapted.active_adapter == adapter:
        adapted.trainable = is_trainable
    return adapted


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
            `naming`, or `save_projection=False` with projections PEFT would
            not regenerate.
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
    state, tensors, alpha = (
        target.state,
        dict(target.head_tensors),
        target.state.config.alpha,
    )
    for module, paths in target.modules:
        key = f"base_model.model.{module}.pvera_lambda_"
        # A fused group's layers share lambda_d; lambda_b runs over all parts.
        tensors[key + "d"] = np.asarray(state.lambda_d[paths[0]], "float32")
        tensors[key + "b"] = np.concatenate(
            [np.asarray(alpha * state.lambda_b[p], "float32") for p in paths]
        )
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
    config = {
        "peft_type": "PVERA",
        "r": state.rank,
        "projection_prng_key": state.config.seed,
        "save_projection": bool(save_projection),
        "pvera_dropout": state.config.dropout,
        "d_initial": state.config.d_initial,
        "sample_at_inference": state.config.sample_at_inference,
        "init_weights": True,
        "generator_seed": state.config.generator_seed,
        **target.config_fields(),
    }
    write_peft_folder(path, tensors, config)


class PeftTarget:
    """An adapter as PEFT will see it: its state and PEFT module names.

    What every PEFT writer (PVeRA, LoRA) shares: the adapter's `name` and
    `state` (`AdapterState`), its PEFT `modules` (a list of `(module name, keras
    paths)` in model order: one path for a module KerasHub keeps whole,
    the parts in output order for a fused module such as GPT-2's
    `c_attn`), the `head_tensors` of the layers trained in full (PEFT's
    `modules_to_save`), and the architecture's `spec`.
    """

    def __init__(self, name, state, spec, head, modules, head_tensors):
        self.name = name
        self.state = state
        self.spec = spec
        self.head = head
        self.modules = modules
        self.head_tensors = head_tensors

    def config_fields(self):
        """The `adapter_config.json` fields every PEFT method writes alike."""
        return {
            # Full module names: exactly these modules, whatever else the
            # Hugging Face model holds.
            "target_modules": sorted(module for module, _ in self.modules),
            # PEFT sets it itself for Conv1D modules, warning; GPT-2's are.
            "fan_in_fan_out": self.spec.layouts() == {"conv1d"},
            "bias": "none",
            "modules_to_save": (
                list(self.head.modules_to_save) if self.state.trainable else None
            ),
            "layers_to_transform": None,
            "layers_pattern": None,
            "base_model_name_or_path": None,
            "revision": None,
            "task_type": None,
            "inference_mode": True,
        }


def peft_target(model, adapter, naming, module_prefix, what):
    """Collects an adapter and names its modules as PEFT does.

    Args:
        model: A `PVeRAModel` over a KerasHub model with a module-name table.
        adapter: The adapter's name; `None` for the active one.
        naming: One of `NAMINGS`, or `None` for the installed transformers'.
        module_prefix: The Hugging Face module prefix, or `None` for the
            task head's (else `""`).
        what: The file kind, for messages (`"PEFT"`, `"PEFT LoRA"`).

    Returns:
        A `PeftTarget`.

    Raises:
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: For a bad `naming`, a calibrated model, an architecture
            without a table, an adapted layer without a Hugging Face
            equivalent (or one part of a fused module alone), or layers
            trained in full that are no task head's.
    """
    naming = default_naming() if naming is None else naming
    if naming not in NAMINGS:
        raise ValueError(
            f"`naming` must be one of {list(NAMINGS)} or None. "
            f"Received: naming={naming!r}"
        )
    check_uncalibrated(model, f"{what} adapter files")
    state = adapter_state_of(model, adapter)
    spec, keras_prefix = find_spec(model.base_model)
    head = _task_head(model.base_model, spec)
    if module_prefix is None:
        module_prefix = head.model_prefix if head is not None else ""
    head_tensors, modules = _head_tensors(state, head), []
    grouped = {p: group for group in state.config.fused_groups or () for p in group}
    for keras_path in state.layers:
        group = grouped.get(keras_path)
        if group is not None:
            if keras_path == group[0]:  # The group once, at its first layer.
                module = _fused_module(group, keras_prefix, spec, module_prefix)
                modules.append((module, tuple(group)))
            continue
        module = None
        if keras_path.startswith(keras_prefix):
            module = spec.hf_module(
                keras_path[len(keras_prefix) :], naming, module_prefix
            )
        if module is None:
            raise ValueError(
                f"Adapted layer {keras_path!r} has no Hugging Face equivalent "
                f"in the {spec.backbone} table."
                + _fused_hint(spec, keras_path[len(keras_prefix) :], keras_prefix)
            )
        modules.append((module, (keras_path,)))
    name = model.active_adapter if adapter is None else adapter
    return PeftTarget(name, state, spec, head, modules, head_tensors)


def write_peft_folder(path, tensors, config):
    """Writes `adapter_model.safetensors` and `adapter_config.json`, each
    atomically, into folder `path` (created if needed)."""
    os.makedirs(path, exist_ok=True)
    safetensors_io.write_safetensors(
        os.path.join(path, WEIGHTS_FILE), tensors, {"format": "pt"}
    )
    safetensors_io.write_text(
        os.path.join(path, CONFIG_FILE), json.dumps(config, indent=2) + "\n"
    )


def read_peft_config(path):
    """Reads and checks a PEFT PVeRA `adapter_config.json`.

    Args:
        path: The adapter folder.

    Returns:
        The config as a dict, with PEFT's defaults for absent fields.

    Raises:
        FileNotFoundError: If the folder has no `adapter_config.json`.
        ValueError: If the config is not PVeRA's, is malformed, or uses a
            feature keras_pvera does not map.
    """
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"No PEFT adapter config at {config_path!r}.")
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        hint = ""
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            hint = (
                " It has adapter_model.bin, a pickle file, which keras_pvera "
                "does not read (loading pickle can run code); convert it to "
                "safetensors with PEFT."
            )
        raise FileNotFoundError(
            f"No {WEIGHTS_FILE} in PEFT adapter folder {path!r}.{hint}"
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise ValueError(f"{config_path!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "PVERA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(
            f"{config_path!r} is not a PVeRA adapter config: "
            f"peft_type={peft_type!r}, expected 'PVERA'."
        )
    defaults = {
        "r": 256,
        "projection_prng_key": 0,
        "save_projection": True,
        "pvera_dropout": 0.0,
        "d_initial": 0.1,
        "sample_at_inference": False,
        "bias": "none",
        "modules_to_save": None,
        "generator_seed": None,
    }
    config = {**defaults, **config}
    rank = config["r"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{config_path!r} has a bad r={rank!r}.")
    key = config["projection_prng_key"]
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise ValueError(
            f"{config_path!r} has a bad projection_prng_key={key!r}; "
            "expected a non-negative integer."
        )
    generator_seed = config["generator_seed"]
    if generator_seed is not None and (
        isinstance(generator_seed, bool)
        or not isinstance(generator_seed, int)
        or generator_seed < 0
    ):
        raise ValueError(
            f"{config_path!r} has a bad generator_seed={generator_seed!r}; "
            "expected a non-negative integer or null."
        )
    if config["bias"] not in ("none", "all", "pvera_only"):
        raise ValueError(
            f"{config_path!r} has bias={config['bias']!r}; PEFT's PVeRA "
            "knows 'none', 'all' and 'pvera_only'."
        )
    if config["bias"] != "none":
        trained = (
            "every bias of the model (LayerNorms' too)"
            if config["bias"] == "all"
            else "the adapted modules' own biases (`<module>.base_layer.bias`)"
        )
        raise ValueError(
            f"{config_path!r} has bias={config['bias']!r}: PEFT trained "
            f"{trained} beside the vectors and saved them, changing the base "
            "model itself (PEFT's disable_adapter() then no longer gives the "
            "base model's outputs). keras_pvera keeps the base model frozen, "
            "so that disabling or unloading an adapter gives the base model "
            "exactly, and reads adapters with bias='none' only. Train with "
            "bias='none' in PEFT, or set the biases into the base model "
            "before loading."
        )
    saved = config["modules_to_save"]
    if saved is not None and (
        not isinstance(saved, list) or not all(isinstance(m, str) for m in saved)
    ):
        raise ValueError(
            f"{config_path!r} has a bad modules_to_save={saved!r}; expected "
            "a list of module names or null."
        )
    return config


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


def _fused_hint(spec, keras_path, keras_prefix):
    """How to save a layer that is one part of a fused torch module."""
    for entry in spec.fused:
        for part in entry.keras:
            numbers = match_template(part, keras_path)
            if numbers is not None:
                group = [keras_prefix + fill_template(p, numbers) for p in entry.keras]
                return (
                    f" It is one part of the fused torch module "
                    f"{fill_template(entry.hf, numbers)!r}, whose PEFT adapter "
                    "has one latent: adapt all its parts as a fused group, "
                    f"`fused_groups=[{group}]` (load_peft_adapter does)."
                )
    return ""


def _fused_module(group, keras_prefix, spec, module_prefix):
    """The PEFT module name of a fused group's layers."""
    module = None
    if all(path.startswith(keras_prefix) for path in group):
        parts = [path[len(keras_prefix) :] for path in group]
        module = spec.hf_fused_module(parts, module_prefix)
    if module is None:
        raise ValueError(
            f"Fused group {list(group)} is no fused module of the "
            f"{spec.backbone} table"
            + (
                f" (those: {[e.hf for e in spec.fused]}, parts in order "
                f"{[list(e.keras) for e in spec.fused]})."
                if spec.fused
                else "; PEFT would adapt its layers one by one: adapt them "
                "without `fused_groups`."
            )
        )
    return module


def _is_saved_module(module, modules_to_save):
    # PEFT matches modules_to_save names against the end of module names.
    return any(
        module == name or module.endswith("." + name) or module.startswith(name + ".")
        for name in modules_to_save or ()
    )


def _head_tensors(state, head):
    """PEFT's tensors for the layers trained in full: a task head's."""
    if not state.trainable:
        return {}
    modules = {keras_path: hf for hf, keras_path in (head.layers if head else ())}
    tensors = {}
    for keras_path, arrays in state.trainable.items():
        if keras_path not in modules:
            raise ValueError(
                f"Layer {keras_path!r} is trained in full beside the adapters, "
                "but is no layer of a task head that PEFT's modules_to_save "
                "can carry"
                + (f" (those of {head.task}: {sorted(modules)})" if head else "")
                + ". Save it with keras_pvera.save_adapter instead."
            )
        key = f"base_model.model.{modules[keras_path]}."
        tensors[key + "weight"] = np.asarray(arrays[0], "float32").T.copy()
        if len(arrays) > 1:
            tensors[key + "bias"] = np.asarray(arrays[1], "float32")
    return tensors


def _task_head(model, spec):
    """The `TaskHead` of the KerasHub task `model`, or `None`."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("keras_hub"):
            head = spec.head(cls.__name__)
            if head is not None:
                return head
    return None


def _head_weights(model, spec, saved, config, layers):
    """`{keras path: [kernel, bias]}` for PEFT's saved head modules."""
    if not saved:
        return {}
    head = _task_head(model, spec)
    if head is None:
        raise ValueError(
            f"The PEFT adapter trains modules {sorted(saved)} in full "
            f"(modules_to_save={config['modules_to_save']!r}), which load only "
            "onto a KerasHub task computing the same head. Model "
            f"{model.name!r} of type {type(model).__name__} is none of "
            f"{[h.task for h in spec.heads]}."
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
        layer = layers.get(keras_path)
        if not isinstance(layer, keras.layers.Dense):
            raise ValueError(
                f"PEFT saved module {module!r} maps to {head.task} layer "
                f"{keras_path!r}, which model {model.name!r} does not have "
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
        trainable[keras_path] = [np.array(weight.T)] + (
            [np.asarray(bias)] if layer.use_bias else []
        )
    return trainable


def _projections(config, tensors, state, path):
    (rows_a, in_max), (out_max, rank) = state.projection_shapes()
    if not config["save_projection"]:
        # PEFT regenerates them even when the file has some.
        return torch_projections(config["projection_prng_key"], rank, in_max, out_max)
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
