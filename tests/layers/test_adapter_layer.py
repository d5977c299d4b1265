"""The named-adapter state every adapted layer shares (`AdapterLayer`)."""

import keras
import pytest

from keras_pvera import PVeRAConfig
from keras_pvera import PVeRADense
from keras_pvera.src.layers.adapter_layer import AdapterLayer
from keras_pvera.src.layers.adapter_layer import as_names
from keras_pvera.src.layers.adapter_layer import check_adapter_name
from keras_pvera.src.layers.trained_copies import TrainedCopies


def test_names_are_read_and_checked_one_way():
    assert as_names(None) == ()
    assert as_names("a") == ("a",)
    assert as_names(["a", "b"]) == ("a", "b")
    for bad in ("", "a/b", 3):
        with pytest.raises(ValueError, match=f"adapter_name={bad!r}"):
            check_adapter_name(bad)


def two_adapters(kind):
    """A built layer of `kind` holding adapters "a" and "b", "a" active."""
    base = keras.layers.Dense(2)
    base.build((None, 3))
    if kind == "adapted":
        layer = PVeRADense(base, rank=2, adapter_name="a")
        layer.add_adapter("b", PVeRAConfig(rank=2))
        return layer, base
    layer = TrainedCopies(base)
    layer.add_copy("a")
    layer.add_copy("b")
    layer.set_active_adapter("a")
    return layer, base


def trained(layer):
    """The ids of the layer's trainable weights."""
    return {id(w) for w in layer.trainable_weights}


@pytest.mark.parametrize("kind", ["adapted", "trained_in_full"])
def test_both_kinds_follow_one_trainable_rule(kind):
    layer, base = two_adapters(kind)
    assert isinstance(layer, AdapterLayer)
    assert layer.adapter_names == ["a", "b"]
    assert (layer.active_adapter, layer.merged_adapter) == ("a", None)
    only_a = trained(layer)
    assert only_a and not only_a & {id(w) for w in base.weights}
    layer.set_active_adapter(["b", "not held"])
    assert layer.active_adapters == ["b"]
    assert trained(layer) and not trained(layer) & only_a
    layer.adapter_enabled = False
    assert trained(layer) == set()
    layer.adapter_enabled = True
    layer.trainable = False
    assert trained(layer) == set()
    # Toggling `trainable` back never thaws the wrapped layer.
    layer.trainable = True
    assert not base.trainable and not trained(layer) & {id(w) for w in base.weights}
