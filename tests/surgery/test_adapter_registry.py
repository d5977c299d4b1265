"""`AdapterRegistry`: selecting, wrapping, swapping in, freezing, and undoing it."""

import keras
import numpy as np
import pytest

from keras_pvera import PVeRAConfig
from keras_pvera import PVeRADense
from keras_pvera.src.surgery.adapter_registry import AdapterRegistry
from keras_pvera.src.surgery.layer_selection import adaptable_layers
from keras_pvera.src.surgery.layer_selection import select_targets


def mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Dense(8, name="middle"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def flags(model):
    return {v.path: v.trainable for v in model.weights} | {
        path: layer.trainable for path, layer in adaptable_layers(model)
    }


def test_wrapped_layers_are_selected_by_their_base_name():
    model = mlp()
    adapter_registry = AdapterRegistry(model)
    adapter_registry.add("default", PVeRAConfig(rank=2, target=["hidden", "middle"]))
    layers = dict(adaptable_layers(model))
    assert list(layers) == ["hidden", "norm", "middle", "head"]
    assert isinstance(layers["hidden"], PVeRADense)
    chosen = select_targets(model, ["hidden", "head"])
    assert list(chosen) == ["hidden", "head"]
    assert chosen["hidden"] is layers["hidden"]


def test_all_leaves_out_output_layers():
    assert list(select_targets(mlp(), "all")) == ["hidden", "middle"]


def test_freeze_keeps_only_vectors_and_trainable_layers():
    model = mlp()
    adapter_registry = AdapterRegistry(model)
    adapter_registry.add(
        "default",
        PVeRAConfig(rank=2, target=["hidden"], trainable_layers=["head"]),
    )
    assert sorted(w.name for w in model.trainable_weights) == [
        "bias",
        "kernel",
        "pvera_lambda_b",
        "pvera_lambda_d",
    ]
    # BatchNormalization holds nothing that trains: set trainable=False, so it
    # runs in inference mode while the adapters train.
    assert model.get_layer("norm").trainable is False


def test_freeze_again_puts_back_what_a_toggle_thawed():
    model = mlp()
    adapter_registry = AdapterRegistry(model)
    adapter_registry.add("default", PVeRAConfig(rank=2, target=["hidden"]))
    frozen = flags(model)
    model.trainable = False
    model.trainable = True
    assert flags(model) != frozen  # Keras' recursive setter thawed the base.
    adapter_registry.freeze()
    assert flags(model) == frozen


def test_unload_restores_layers_flags_and_outputs():
    model = mlp()
    model.get_layer("norm").trainable = False  # A user's own choice, kept.
    before = flags(model)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    expected = model.predict(x, verbose=0)
    layers = [layer for layer in model.layers]
    adapter_registry = AdapterRegistry(model)
    adapter_registry.add("default", PVeRAConfig(rank=2, target="all"))
    adapter_registry.unload()
    assert model.layers == layers
    assert flags(model) == before
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)


def test_a_failed_add_changes_nothing():
    model = mlp()
    adapter_registry = AdapterRegistry(model)
    adapter_registry.add("default", PVeRAConfig(rank=2, target=["head"]))  # 8 -> 3
    before = flags(model)
    with pytest.raises(ValueError, match="'hidden' \\(6 -> 8\\), larger than"):
        adapter_registry.add("second", PVeRAConfig(rank=2, target=["hidden"]))
    with pytest.raises(ValueError, match="rank=4"):
        adapter_registry.add("second", PVeRAConfig(rank=4, target=["head"]))
    with pytest.raises(ValueError, match="matches no layer"):
        adapter_registry.add("third", PVeRAConfig(rank=2, target=["missing"]))
    assert list(adapter_registry.adapters) == ["default"]
    assert flags(model) == before
    assert type(model.get_layer("hidden")) is keras.layers.Dense


def test_a_failed_first_adapter_leaves_no_projection_registry(monkeypatch):
    model = mlp()
    adapter_registry = AdapterRegistry(model)

    def broken_freeze(*args):
        raise RuntimeError("freeze failed")

    with monkeypatch.context() as patch:
        patch.setattr(AdapterRegistry, "freeze", broken_freeze)
        with pytest.raises(RuntimeError, match="freeze failed"):
            adapter_registry.add("default", PVeRAConfig(rank=2, target=["hidden"]))
    assert adapter_registry.registry is None
    # The next first adapter makes its own registry: another rank fits.
    adapter_registry.add("default", PVeRAConfig(rank=4, target=["hidden"]))
    assert adapter_registry.registry is not None
    assert isinstance(dict(adaptable_layers(model))["hidden"], PVeRADense)
