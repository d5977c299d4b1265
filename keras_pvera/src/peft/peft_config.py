"""PEFT's PVeRA `adapter_config.json`, field by field, as a `PVeRAConfig`.

One table (`PVERA_FIELDS`) says which PEFT field holds which `PVeRAConfig`
setting; reading (`read_peft_config`) and writing (`pvera_fields`) both go
through it, and `PVeRAConfig` checks the values read, as it checks every
other. `NOT_IN_PEFT` says, for each setting no PEFT field holds, what a PEFT
adapter has instead, so that every setting has one rule
(`settings_without_peft_rule` names a new setting that has none). The other
fields of the file (`bias`, `modules_to_save`, the target modules) are
PEFT's own: they say which modules are adapted or trained in full.
"""

import dataclasses
import json
import os

from keras_pvera.src.layers.pvera_config import SETTING_NAMES
from keras_pvera.src.layers.pvera_config import PVeRAConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class PeftField:
    """One field of PEFT's PVeRA config.

    Args:
        peft: The field's name in `adapter_config.json`.
        setting: The `PVeRAConfig` setting holding its value, or `None` for
            a field that is no setting.
        written: For a field that is no setting: the value written.
    """

    peft: str
    setting: str = None
    written: object = None


# PEFT's PVeRA fields, in the order its files list them. An absent field
# takes PEFT's default, which is the setting's default in `PVeRAConfig`.
PVERA_FIELDS = (
    PeftField("r", "rank"),
    PeftField("projection_prng_key", "seed"),
    PeftField("save_projection", "save_projection"),
    PeftField("pvera_dropout", "dropout"),
    PeftField("d_initial", "d_initial"),
    PeftField("sample_at_inference", "sample_at_inference"),
    # How PEFT initialises new vectors; an adapter file brings its own.
    PeftField("init_weights", written=True),
    PeftField("generator_seed", "generator_seed"),
)

# The `PVeRAConfig` settings that no field of `PVERA_FIELDS` holds, and what
# a PEFT adapter has instead.
NOT_IN_PEFT = {
    "target": "`target_modules` names the adapted modules",
    "trainable_layers": "`modules_to_save` names a task head's modules",
    "fused_groups": "one fused module (GPT-2's `c_attn`) stands for its parts",
    "alpha": "PEFT has no output scale: folded into `lambda_b` on writing, "
    "1 on reading",
    "kl_weight": "PEFT has no KL term: not written, 0 on reading",
    "max_log_variance": "PEFT has no bound on the log-variance: saving "
    "refuses an adapter with one, None on reading",
}

# The values PEFT's `bias` may take; keras_pvera reads "none" only.
_BIASES = ("none", "all", "pvera_only")


def settings_without_peft_rule():
    """The `PVeRAConfig` settings that neither `PVERA_FIELDS` nor
    `NOT_IN_PEFT` names: a setting added without saying what PEFT makes
    of it. Empty when every setting has its rule.

    Example:

    >>> settings_without_peft_rule()
    ()
    """
    ruled = {f.setting for f in PVERA_FIELDS} | set(NOT_IN_PEFT)
    return tuple(name for name in SETTING_NAMES if name not in ruled)


def pvera_fields(config):
    """PEFT's PVeRA fields for a `PVeRAConfig`, in PEFT's order.

    Args:
        config: A `PVeRAConfig`.

    Returns:
        A dict from PEFT field name to value.

    Example:

    >>> pvera_fields(PVeRAConfig(rank=4))["r"]
    4
    """
    return {
        f.peft: f.written if f.setting is None else getattr(config, f.setting)
        for f in PVERA_FIELDS
    }


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """A PEFT PVeRA `adapter_config.json` as keras_pvera reads it.

    Args:
        settings: The `PVeRAConfig` of its PVeRA fields; `save_projection`
            says, as in the file, whether the file holds the projections.
        modules_to_save: PEFT's `modules_to_save`: a list of module names
            trained in full, or `None`.
    """

    settings: PVeRAConfig
    modules_to_save: list = None


def read_peft_config(path):
    """Reads and checks a PEFT PVeRA `adapter_config.json`.

    Args:
        path: The adapter folder.

    Returns:
        A `PeftConfig`; absent fields take PEFT's defaults.

    Raises:
        FileNotFoundError: If the folder has no `adapter_config.json` or no
            `adapter_model.safetensors`.
        ValueError: If the config is not PVeRA's, holds a bad value (the
            message names the PEFT field and its value), or uses a feature
            keras_pvera does not map.
    """
    config_path = os.path.join(path, CONFIG_FILE)
    _check_files(path, config_path)
    fields = _read_json(config_path)
    _check_bias(config_path, fields.get("bias", "none"))
    saved = fields.get("modules_to_save")
    if saved is not None and (
        not isinstance(saved, list) or not all(isinstance(m, str) for m in saved)
    ):
        raise ValueError(
            f"{config_path!r} has a bad modules_to_save={saved!r}; expected "
            "a list of module names or null."
        )
    return PeftConfig(_settings(config_path, fields), saved)


def _check_files(path, config_path):
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


def _read_json(config_path):
    """The config's fields, once sure it is PVeRA's."""
    try:
        with open(config_path, encoding="utf-8") as f:
            fields = json.load(f)
    except ValueError as e:
        raise ValueError(f"{config_path!r} is not valid JSON: {e}") from None
    if not isinstance(fields, dict) or fields.get("peft_type") != "PVERA":
        peft_type = fields.get("peft_type") if isinstance(fields, dict) else None
        raise ValueError(
            f"{config_path!r} is not a PVeRA adapter config: "
            f"peft_type={peft_type!r}, expected 'PVERA'."
        )
    return fields


def _check_bias(config_path, bias):
    if bias not in _BIASES:
        raise ValueError(
            f"{config_path!r} has bias={bias!r}; PEFT's PVeRA knows 'none', "
            "'all' and 'pvera_only'."
        )
    if bias == "none":
        return
    trained = (
        "every bias of the model (LayerNorms' too)"
        if bias == "all"
        else "the adapted modules' own biases (`<module>.base_layer.bias`)"
    )
    raise ValueError(
        f"{config_path!r} has bias={bias!r}: PEFT trained "
        f"{trained} beside the vectors and saved them, changing the base "
        "model itself (PEFT's disable_adapter() then no longer gives the "
        "base model's outputs). keras_pvera keeps the base model frozen, "
        "so that disabling or unloading an adapter gives the base model "
        "exactly, and reads adapters with bias='none' only. Train with "
        "bias='none' in PEFT, or set the biases into the base model "
        "before loading."
    )


def _settings(config_path, fields):
    """The `PVeRAConfig` of the PVeRA fields; `PVeRAConfig` checks them."""
    settings = {
        f.setting: fields[f.peft]
        for f in PVERA_FIELDS
        if f.setting is not None and f.peft in fields
    }
    # One setting at a time first, so that a refusal names PEFT's field.
    for field in PVERA_FIELDS:
        if field.setting in settings:
            try:
                PVeRAConfig(**{field.setting: settings[field.setting]})
            except ValueError as e:
                raise ValueError(
                    f"{config_path!r} has a bad {field.peft}="
                    f"{fields[field.peft]!r} (keras_pvera's `{field.setting}`): "
                    f"{e}"
                ) from None
    return PVeRAConfig(**settings)
