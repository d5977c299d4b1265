"""An adapter as a PEFT file will name it: what every PEFT writer shares.

The PVeRA writer (`peft_interop.save_peft_adapter`) and the LoRA writer
(`lora_adapter.save_lora_adapter`) both name an adapter's layers as PEFT's
modules through the architecture's table, write a task head trained in
full as PEFT's `modules_to_save`, and write the folder's two files.
"""

import json
import os

import numpy as np

from keras_pvera.src.peft.architecture_spec import NAMINGS
from keras_pvera.src.peft.architecture_spec import fill_template
from keras_pvera.src.peft.architecture_spec import match_template
from keras_pvera.src.peft.module_names import default_naming
from keras_pvera.src.peft.module_names import find_spec
from keras_pvera.src.peft.module_names import task_head
from keras_pvera.src.peft.peft_config import CONFIG_FILE
from keras_pvera.src.peft.peft_config import WEIGHTS_FILE
from keras_pvera.src.saving import safetensors_io
from keras_pvera.src.saving.adapter_state import adapter_state_of
from keras_pvera.src.saving.adapter_state import check_uncalibrated


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
    head = task_head(model.base_model, spec)
    if module_prefix is None:
        module_prefix = head.model_prefix if head is not None else ""
    head_tensors = _head_tensors(state, head)
    names = _ModuleNames(spec, keras_prefix, naming, module_prefix)
    modules = names.modules(state.layers, state.config.fused_groups)
    name = model.active_adapter if adapter is None else adapter
    return PeftTarget(name, state, spec, head, modules, head_tensors)


class _ModuleNames:
    """Names adapted KerasHub layers as PEFT's modules, through a table.

    Args:
        spec: The architecture's `ArchitectureSpec`.
        keras_prefix: The backbone's path in the model, followed by `/`.
        naming: One of `NAMINGS`.
        module_prefix: The Hugging Face module prefix.
    """

    def __init__(self, spec, keras_prefix, naming, module_prefix):
        self.spec = spec
        self.keras_prefix = keras_prefix
        self.naming = naming
        self.module_prefix = module_prefix

    def modules(self, keras_paths, fused_groups):
        """`[(module name, keras paths)]` in layer order, groups at their first."""
        grouped = {p: group for group in fused_groups or () for p in group}
        modules = []
        for keras_path in keras_paths:
            group = grouped.get(keras_path)
            if group is None:
                modules.append((self.module(keras_path), (keras_path,)))
            elif keras_path == group[0]:  # The group once, at its first layer.
                modules.append((self.fused_module(group), tuple(group)))
        return modules

    def module(self, keras_path):
        """The PEFT module name of one adapted layer."""
        relative = keras_path[len(self.keras_prefix) :]
        module = None
        if keras_path.startswith(self.keras_prefix):
            module = self.spec.hf_module(relative, self.naming, self.module_prefix)
        if module is None:
            raise ValueError(
                f"Adapted layer {keras_path!r} has no Hugging Face equivalent "
                f"in the {self.spec.backbone} table." + self.fused_hint(relative)
            )
        return module

    def fused_hint(self, keras_path):
        """How to save a layer that is one part of a fused torch module."""
        for entry in self.spec.fused:
            for part in entry.keras:
                numbers = match_template(part, keras_path)
                if numbers is None:
                    continue
                group = [
                    self.keras_prefix + fill_template(p, numbers) for p in entry.keras
                ]
                return (
                    f" It is one part of the fused torch module "
                    f"{fill_template(entry.hf, numbers)!r}, whose PEFT adapter "
                    "has one latent: adapt all its parts as a fused group, "
                    f"`fused_groups=[{group}]` (load_peft_adapter does)."
                )
        return ""

    def fused_module(self, group):
        """The PEFT module name of a fused group's layers."""
        spec, module = self.spec, None
        if all(path.startswith(self.keras_prefix) for path in group):
            parts = [path[len(self.keras_prefix) :] for path in group]
            module = spec.hf_fused_module(parts, self.module_prefix)
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
