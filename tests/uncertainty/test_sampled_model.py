"""`read_model`: what a Monte Carlo run asks a model, once per call."""

import keras
import numpy as np
import pytest

import keras_pvera
from keras_pvera import PVeRAModel
from keras_pvera.src.uncertainty.sampled_model import read_model


def adapted(head_activation="softmax"):
    """A small adapted model: `default` adapts `hidden`, `other` the head."""
    base = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8, name="hidden"),
            keras.layers.Dense(3, activation=head_activation, name="head"),
        ]
    )
    model = keras_pvera.apply(base, rank=2, target=["hidden"], seed=0)
    model.add_adapter("other", rank=2, seed=0, target=["head"])
    return model


def test_a_pvera_model_answers_for_itself():
    model = adapted()
    parts = read_model(model)
    assert parts.model is model and parts.named_adapters
    assert list(parts.adapted_layers) == list(model.adapted_layers)
    assert parts.active_layers() is parts.adapted_layers
    # Every PVeRA layer has its noise stream, whichever adapters are active.
    streams = {id(layer) for layer in parts.noise_streams}
    assert len(streams) == 2
    assert streams >= {id(layer) for layer in parts.adapted_layers.values()}
    assert parts.layers_of(["other"]).keys() != parts.adapted_layers.keys()
    assert parts.output_kinds == [False]  # The softmax head.
    assert parts.task is None and parts.calibration is None


@pytest.mark.parametrize(
    "head_activation, calibrated_from_logits, kinds",
    [
        ("relu", True, [True]),  # The base does not say; the calibration does.
        ("softmax", True, [False]),  # The base says.
        (None, False, [True]),
    ],
)
def test_a_calibration_says_what_the_base_model_does_not(
    head_activation, calibrated_from_logits, kinds
):
    model = adapted(head_activation)
    assert read_model(model).output_kinds == [
        {"relu": None, "softmax": False, None: True}[head_activation]
    ]
    calibration = {"temperature": 2.0, "from_logits": calibrated_from_logits}
    model.calibration = calibration
    parts = read_model(model)
    assert parts.output_kinds == kinds
    assert parts.calibration == calibration


def test_a_plain_keras_model_is_read_from_its_layers():
    model = adapted()
    parts = read_model(model.base_model)  # Holds the PVeRA layers, no registry.
    assert not parts.named_adapters and parts.layers_of is None
    assert {id(layer) for layer in parts.adapted_layers.values()} == {
        id(layer) for layer in model.adapted_layers.values()
    }
    assert len(parts.noise_streams) == 2
    assert parts.output_kinds == [False]
    # A model holding the adapted model outputs what the adapted model does.
    holding = keras.Sequential([keras.Input((8,)), model])
    assert read_model(holding).output_kinds == [False]
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    unadapted = read_model(plain)
    assert unadapted.adapted_layers == {} and unadapted.output_kinds == [True]
    with pytest.raises(ValueError, match="has no PVeRA layers"):
        unadapted.active_layers()


def test_a_run_asks_the_model_once(monkeypatch):
    model = adapted()
    asked = []
    sampled_model = PVeRAModel.sampled_model

    def counted(self):
        asked.append(self)
        return sampled_model(self)

    monkeypatch.setattr(PVeRAModel, "sampled_model", counted)
    x = np.ones((2, 8), "float32")
    keras_pvera.predict_with_uncertainty(model, x, n=2, seed=0, verbose=0)
    assert asked == [model]
    keras_pvera.predict_with_uncertainty(
        model, x, n=2, seed=0, verbose=0, adapter_names=["default", "other"]
    )
    assert asked == [model, model]
