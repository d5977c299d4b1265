"""PVeRA on convolutions: the adapter of the map from a patch to the filters.

The formula on the matrix of patches (im2col), sampling, merging and the
files are checked for Conv1D, Conv2D and Conv3D by the battery of every
adapted layer kind (tests/layers/test_adapted_layer_kinds.py); here, what
is particular to convolutions.
"""

import keras
import numpy as np
import pytest
from builders import to_numpy

import keras_pvera
from keras_pvera import PVeRADense


def tiny_cnn():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(6, 3, strides=2, name="c2")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def test_training_a_convolution_adapter_adds_its_kl_term_and_learns():
    model = keras_pvera.apply(tiny_cnn(), rank=4, target=["c1", "c2"], kl_weight=0.5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 2)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")
    model(x, training=True)
    assert len(model.losses) == 2
    before = [to_numpy(w) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    after = [to_numpy(w) for w in model.trainable_weights]
    assert len(after) == 4
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize(
    "layer, name",
    [
        (keras.layers.Conv2D(4, 3, groups=2, name="grouped"), "groups=2"),
        (keras.layers.DepthwiseConv2D(3, name="depthwise"), "DepthwiseConv2D"),
        (keras.layers.SeparableConv2D(4, 3, name="separable"), "SeparableConv2D"),
        (keras.layers.Conv2DTranspose(4, 3, name="transposed"), "Conv2DTranspose"),
    ],
    ids=["grouped", "depthwise", "separable", "transposed"],
)
def test_other_convolutions_are_refused_naming_the_layer(layer, name):
    inputs = keras.Input((6, 6, 4))
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(layer(inputs)))
    base = keras.Model(inputs, outputs)
    with pytest.raises(TypeError, match=f"'{layer.name}'.*{name}"):
        keras_pvera.apply(base, rank=2, target=[layer.name])
    with pytest.raises(TypeError, match="Conv1D, Conv2D, Conv3D"):
        PVeRADense(layer, rank=2)
