"""Writing a PVeRA adapter's mean as a Hugging Face PEFT LoRA adapter.

At its mean (sampling off), a PVeRA adapter adds to each adapted linear map
the rank-`r` matrix `down @ up` (`PVeRADense.mean_factors`): exactly a LoRA.
PEFT's LoRA adds `lora_alpha / r * lora_B.weight @ lora_A.weight` in
PyTorch's `(out, in)` layout, so with `lora_alpha = r`:

    lora_A.weight = down.T = diag(lambda_d[:r]) @ A[:r, :in]        # (r, in)
    lora_B.weight = up.T   = diag(alpha * lambda_b) @ B[:out, :]    # (out, r)

Module names, fused modules and task heads are those of the PEFT PVeRA
writer (`peft_target.peft_target`): a fused module (GPT-2's `c_attn`) has
one latent, so its parts share `lora_A` and their `lora_B` rows stack in the
module's output order. The logvar half of the latent (the sampling) has no
LoRA equivalent and is not written.
"""

import keras
import numpy as np

from keras_pvera.src.peft.peft_target import peft_target
from keras_pvera.src.peft.peft_target import write_peft_folder


def save_lora_adapter(model, path, *, adapter=None, naming=None, module_prefix=None):
    """Writes an adapter's mean as a PEFT LoRA adapter folder.

    Engines that serve LoRA adapters (PEFT and transformers themselves, and
    servers that read PEFT's LoRA folders) then serve the adapted model's
    mean predictions: `peft.PeftModel.from_pretrained(hf_model, path)` on
    the Hugging Face equivalent of the KerasHub model gives the Keras
    model's mean outputs (sampling off). The rank is the adapter's `r`,
    and `lora_alpha = r`, so PEFT's scaling is 1.

    Only the mean is written: an adapter with `sample_at_inference=True` is
    written too, as the predictions' mean, since LoRA has no sampling. The
    architectures, module names and `naming` / `module_prefix` are those of
    `save_peft_adapter`; a task head trained in full is written as PEFT's
    `modules_to_save`. To write several adapters, call it once per adapter
    name (for example into `path/<name>`, where PEFT's `save_pretrained`
    puts a non-default adapter).

    Args:
        model: A `PVeRAModel` over a KerasHub backbone (or task) that
            `save_peft_adapter` supports.
        path: The folder to write (created if needed).
        adapter: The adapter's name; `None` for the active one.
        naming: Module naming of the transformers version that will load
            the adapter: `"transformers5"` or `"legacy"`; `None` picks the
            installed transformers' naming.
        module_prefix: Prefix of the Hugging Face module names (`"model."`
            in a `LlamaForCausalLM`); `None` picks the task head's prefix
            for a KerasHub task with a mapped head, else `""`.

    Returns:
        None. The folder holds `adapter_config.json` (`peft_type: "LORA"`)
        and `adapter_model.safetensors`.

    Raises:
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: As `save_peft_adapter`: an architecture without a
            module-name table, an adapted layer without a Hugging Face
            linear module (embeddings and convolutions included), one part
            of a fused module adapted alone, layers trained in full that
            are no task head's, a calibrated model, a bad `naming`.

    Example:

    >>> import os, tempfile
    >>> import keras_hub, keras_pvera
    >>> bert = keras_hub.models.BertBackbone(
    ...     vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=8)
    >>> folder = tempfile.mkdtemp()
    >>> keras_pvera.save_lora_adapter(keras_pvera.apply(bert, rank=4), folder)
    >>> sorted(os.listdir(folder))
    ['adapter_config.json', 'adapter_model.safetensors']

    PEFT then loads it onto the Hugging Face model of the same checkpoint:
    `peft.PeftModel.from_pretrained(hf_bert_model, folder)`.
    """
    target = peft_target(model, adapter, naming, module_prefix, "PEFT LoRA")
    wrappers = model.adapter_registry.layers_of(target.name)
    tensors = dict(target.head_tensors)
    for module, paths in target.modules:
        # A fused group's parts share lambda_d and A: one `down`.
        factors = [wrappers[p].mean_factors(target.name) for p in paths]
        down = _numpy(factors[0][0])
        up = np.concatenate([_numpy(f[1]) for f in factors], axis=1)
        key = f"base_model.model.{module}."
        tensors[key + "lora_A.weight"] = np.ascontiguousarray(down.T)
        tensors[key + "lora_B.weight"] = np.ascontiguousarray(up.T)
    rank = target.state.rank
    config = {
        "peft_type": "LORA",
        "r": rank,
        # PEFT scales LoRA by lora_alpha / r: 1, so B @ A is the delta.
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        **target.config_fields(),
    }
    write_peft_folder(path, tensors, config)


def _numpy(tensor):
    return np.asarray(keras.ops.convert_to_numpy(tensor), "float32")
