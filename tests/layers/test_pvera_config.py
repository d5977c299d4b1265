"""`PVeRAConfig`: one settings object, validated once, serialized as JSON."""

import json

import numpy as np
import pytest
from builders import small_mlp as mlp

import keras_pvera
from keras_pvera import PVeRAConfig
from keras_pvera.src.layers.pvera_config import ADAPTER_SETTING_NAMES
from keras_pvera.src.layers.pvera_config import SETTING_NAMES


def test_defaults_are_peft_compatible_ones():
    config = PVeRAConfig()
    assert (config.rank, config.seed, config.alpha) == (256, 0, 1.0)
    assert (config.d_initial, config.dropout, config.kl_weight) == (0.1, 0.0, 0.0)
    assert config.save_projection is True and config.sample_at_inference is False
    assert config.max_log_variance is None  # PEFT's PVeRA has no bound


def test_json_round_trip():
    config = PVeRAConfig(
        rank=8,
        target=["query", "value"],
        seed=3,
        alpha=16,
        kl_weight=1e-6,
        trainable_layers="head|logits",
        max_log_variance=np.float32(10),
    )
    text = json.dumps(config.to_dict())
    again = PVeRAConfig.from_dict(json.loads(text))
    assert again == config
    assert again.target == ("query", "value") and again.alpha == 16.0
    assert type(again.max_log_variance) is float and again.max_log_variance == 10.0


def test_a_callable_selector_is_not_written():
    config = PVeRAConfig(target=lambda layer: layer.name == "hidden")
    assert config.to_dict()["target"] is None


def test_settings_are_listed_once():
    assert SETTING_NAMES[:2] == ("rank", "target")
    assert set(ADAPTER_SETTING_NAMES) == set(SETTING_NAMES) - {
        "target",
        "trainable_layers",
    }


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": 2.5}, "rank=2.5"),
        ({"rank": True}, "rank=True"),
        ({"seed": -1}, "seed=-1"),
        ({"alpha": 0}, "alpha=0"),
        ({"d_initial": float("nan")}, "d_initial=nan"),
        ({"dropout": 1.0}, r"dropout=1.0"),
        ({"kl_weight": -1e-3}, "kl_weight=-0.001"),
        ({"save_projection": "yes"}, "save_projection='yes'"),
        ({"target": 3}, "target=3"),
        ({"trainable_layers": ["head", 1]}, "1"),
        ({"max_log_variance": -1.0}, "max_log_variance=-1.0"),
        ({"max_log_variance": 0}, "max_log_variance=0"),
        ({"max_log_variance": "10"}, "max_log_variance='10'"),
        ({"max_log_variance": float("inf")}, "max_log_variance=inf"),
        ({"max_log_variance": True}, "max_log_variance=True"),
    ],
)
def test_bad_values_name_themselves(settings, message):
    with pytest.raises(ValueError, match=message):
        PVeRAConfig(**settings)


def test_unknown_names_are_refused_everywhere():
    with pytest.raises(ValueError, match="Unknown PVeRA setting 'ranks'"):
        PVeRAConfig.from_dict({"ranks": 4})
    with pytest.raises(ValueError, match="Unknown PVeRA setting 'ranks'"):
        PVeRAConfig().replace(ranks=4)
    with pytest.raises(ValueError, match="Unknown PVeRA setting 'ranks'"):
        keras_pvera.apply(mlp(), ranks=4)


def test_apply_with_a_config_is_apply_with_settings():
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    config = PVeRAConfig(rank=4, seed=2, alpha=3.0, target=["hidden"])
    by_config = keras_pvera.apply(mlp(), config=config)
    by_settings = keras_pvera.apply(mlp(), rank=4, seed=2, alpha=3.0, target=["hidden"])
    assert by_config.pvera_config == by_settings.pvera_config == config
    for model in (by_config, by_settings):
        model.adapted_layers["hidden"].lambda_b.assign(np.ones(8, "float32"))
    np.testing.assert_array_equal(
        by_config.predict(x, verbose=0), by_settings.predict(x, verbose=0)
    )


def test_settings_override_the_config():
    model = keras_pvera.apply(mlp(), rank=2, config=PVeRAConfig(rank=8, seed=4))
    assert model.pvera_config.rank == 2 and model.pvera_config.seed == 4


def test_a_config_of_another_type_is_refused():
    with pytest.raises(ValueError, match="keras_pvera.PVeRAConfig"):
        keras_pvera.apply(mlp(), config={"rank": 4})
