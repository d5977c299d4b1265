"""`TrainedCopies`: a layer trained in full, its original and one copy per
adapter (PEFT's `ModulesToSaveWrapper`)."""

import keras
import numpy as np
import pytest

from keras_pvera.src.layers.trained_copies import TrainedCopies


def head():
    layer = keras.layers.Dense(2, name="head")
    layer.build((None, 3))
    return layer


def out(layer, x):
    return keras.ops.convert_to_numpy(layer(x))


def test_the_active_copy_runs_and_trains_else_the_original():
    x = np.ones((1, 3), "float32")
    original = head()
    copies = TrainedCopies(original)
    copies.add_copy("a")
    copies.add_copy("b")
    copies.copies["b"].kernel.assign(np.ones((3, 2), "float32"))
    assert copies.trainable_weights == []  # None active: the original runs.
    np.testing.assert_array_equal(out(copies, x), out(original, x))
    copies.set_active_adapter("b")
    np.testing.assert_array_equal(out(copies, x), [[3.0, 3.0]])
    assert copies.kernel is copies.copies["b"].kernel  # Read from the copy.
    assert [w.name for w in copies.trainable_weights] == ["kernel", "bias"]
    copies.adapter_enabled = False
    np.testing.assert_array_equal(out(copies, x), out(original, x))
    assert copies.trainable_weights == []
    copies.adapter_enabled = True
    with pytest.raises(ValueError, match="only one of them can"):
        copies.set_active_adapter(["a", "b"])
    copies.set_active_adapter(["a", "missing"])  # Names it lacks: skipped.
    assert copies.current_layer() is copies.copies["a"]
    copies.delete_copy("a")
    assert copies.adapter_names == ["b"] and len(copies.weights) == 4


def test_config_round_trip():
    copies = TrainedCopies(head())
    copies.add_copy("a")
    copies.set_active_adapter("a")
    config = keras.saving.serialize_keras_object(copies)
    rebuilt = keras.saving.deserialize_keras_object(config)
    assert rebuilt.adapter_names == ["a"] and rebuilt.active_names == ("a",)
    assert [tuple(w.shape) for w in rebuilt.weights] == [
        tuple(w.shape) for w in copies.weights
    ]
