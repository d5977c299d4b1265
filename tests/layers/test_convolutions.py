"""PVeRA on convolutions: the adapter of the map from a patch to the filters.

Checked against the formula on the matrix of patches (im2col) in NumPy.
"""

import math

import keras
import numpy as np
import pytest
from conftest import numpy_pvera
from keras import ops

import keras_pvera
from keras_pvera import PVeRADense


def to_numpy(x):
    return ops.convert_to_numpy(x)


def patches(x, kernel_size, strides, dilation, padding):
    """im2col: `(N, *out positions, prod(kernel_size) * C)` from a
    channels-last `x`, each patch flattened in the kernel's order."""
    spatial = x.shape[1:-1]
    pads = []
    for n, k, s, d in zip(spatial, kernel_size, strides, dilation, strict=True):
        reach = (k - 1) * d + 1
        if padding == "same":
            total = max((math.ceil(n / s) - 1) * s + reach - n, 0)
            pads.append((total // 2, total - total // 2))
        elif padding == "causal":
            pads.append((reach - 1, 0))
        else:
            pads.append((0, 0))
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out_shape = [
        (x.shape[1 + i] - (k - 1) * d - 1) // s + 1
        for i, (k, s, d) in enumerate(zip(kernel_size, strides, dilation, strict=True))
    ]
    rows = np.zeros((x.shape[0], *out_shape, math.prod(kernel_size) * x.shape[-1]))
    for position in np.ndindex(*out_shape):
        window = x
        for axis, (p, k, s, d) in enumerate(
            zip(position, kernel_size, strides, dilation, strict=True)
        ):
            index = p * s + d * np.arange(k)
            window = np.take(window, index, axis=axis + 1)
        rows[(slice(None), *position)] = window.reshape(x.shape[0], -1)
    return rows


CASES = {
    "conv1d_causal_dilated": (
        keras.layers.Conv1D,
        dict(kernel_size=3, padding="causal", dilation_rate=2),
        (9, 2),
    ),
    "conv2d_same_strided": (
        keras.layers.Conv2D,
        dict(kernel_size=(3, 2), strides=(2, 1), padding="same"),
        (7, 6, 3),
    ),
    "conv2d_channels_first": (
        keras.layers.Conv2D,
        dict(kernel_size=3, dilation_rate=2, data_format="channels_first"),
        (3, 8, 7),
    ),
    "conv3d": (
        keras.layers.Conv3D,
        dict(kernel_size=2, strides=(1, 2, 1)),
        (4, 5, 3, 2),
    ),
}


def make_conv(case, filters=4, seed=0):
    conv_class, kwargs, input_shape = CASES[case]
    rng = np.random.default_rng(seed)
    base = conv_class(filters, **kwargs)
    x = rng.normal(size=(2, *input_shape)).astype("float32")
    base.build(x.shape)
    base.bias.assign(rng.normal(size=base.bias.shape))
    layer = PVeRADense(base, rank=3, alpha=2.0, seed=seed)
    layer.lambda_d.assign(rng.normal(0.0, 0.5, layer.lambda_d.shape))
    layer.lambda_b.assign(rng.normal(0.0, 0.5, layer.lambda_b.shape))
    return layer, x


def numpy_conv_pvera(layer, x, eps=None):
    """The layer's output by the Dense formula on the patch matrix."""
    base = layer.base_layer
    channels_first = base.data_format == "channels_first"
    if channels_first:
        x = np.moveaxis(x, 1, -1)
    rows = patches(x, base.kernel_size, base.strides, base.dilation_rate, base.padding)
    kernel = to_numpy(base.kernel).reshape(-1, base.filters)
    a, b = layer.projection_registry.projections(layer.in_dim, layer.out_dim)
    y, latent = numpy_pvera(
        rows,
        kernel,
        to_numpy(base.bias),
        to_numpy(a),
        to_numpy(b),
        to_numpy(layer.lambda_d),
        to_numpy(layer.lambda_b),
        layer.config.alpha,
        eps=eps,
    )
    if channels_first:
        y = np.moveaxis(y, -1, 1)
    return y, latent


@pytest.mark.parametrize("case", sorted(CASES))
def test_convolution_adapter_equals_the_patch_matrix_formula(case):
    if case.endswith("channels_first") and keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow's CPU convolutions only run channels_last")
    layer, x = make_conv(case)
    base = layer.base_layer
    assert (
        layer.in_dim
        == math.prod(base.kernel_size)
        * x.shape[1 if base.data_format == "channels_first" else -1]
    )
    expected, (mu, logvar) = numpy_conv_pvera(layer, x)
    # lambda_b is not zero: the adapter changes the output.
    assert np.abs(expected - to_numpy(base(x))).max() > 1e-2
    # Mean inference (the adapter folded into the kernel).
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-4)
    got_mu, got_logvar = layer.latent(x)
    np.testing.assert_allclose(to_numpy(got_mu), mu, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_numpy(got_logvar), logvar, rtol=1e-4, atol=1e-4)
    # Sampling (training), with the noise the layer draws.
    state = to_numpy(layer.seed_generator.state)
    sampled = to_numpy(layer(x, training=True))
    layer.seed_generator.state.assign(state)
    eps = to_numpy(keras.random.normal(mu.shape, seed=layer.seed_generator))
    expected_sample, _ = numpy_conv_pvera(layer, x, eps=eps)
    np.testing.assert_allclose(sampled, expected_sample, rtol=1e-4, atol=1e-4)


def test_a_new_convolution_adapter_equals_its_base_layer():
    base = keras.layers.Conv2D(3, 3, activation="relu")
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype("float32")
    expected = to_numpy(base(x))
    layer = PVeRADense(base, rank=4)
    np.testing.assert_array_equal(to_numpy(layer(x)), expected)
    assert [tuple(w.shape) for w in layer.trainable_weights] == [(8,), (3,)]


def tiny_cnn():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(6, 3, strides=2, name="c2")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def adapted_cnn(seed=0):
    model = keras_pvera.apply(tiny_cnn(), rank=4, target=["c1", "c2", "hidden"])
    rng = np.random.default_rng(seed)
    for layer in model.adapted_layers.values():
        layer.lambda_d.assign(rng.normal(0.0, 0.5, layer.lambda_d.shape))
        layer.lambda_b.assign(rng.normal(0.0, 0.5, layer.lambda_b.shape))
    return model


def test_a_merged_cnn_equals_the_unmerged_mean_and_round_trips(tmp_path):
    model = adapted_cnn()
    # Convolutions and Dense layers share one pair of projections.
    layers = model.adapted_layers
    registry = layers["c1"].projection_registry
    assert all(layer.projection_registry is registry for layer in layers.values())
    # c1: 3*3*2 -> 4; c2: 3*3*4 -> 6; hidden: 54 -> 5.
    sizes = {path: (layer.in_dim, layer.out_dim) for path, layer in layers.items()}
    assert sizes == {"c1": (18, 4), "c2": (36, 6), "hidden": (54, 5)}
    assert (registry.in_max, registry.out_max) == (54, 6)
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 2)).astype("float32")
    adapted = to_numpy(model(x))
    # lambda_b is not zero: the adapters change the output.
    assert np.abs(adapted - to_numpy(tiny_cnn()(x))).max() > 1e-2
    # The per-position path (as while training) gives the same mean.
    c2 = model.adapted_layers["c2"]
    hidden = model.adapted_layers["c1"](x)
    np.testing.assert_allclose(
        to_numpy(c2._latent_path(c2.base_layer(hidden), hidden, training=False)),
        to_numpy(c2(hidden)),
        rtol=1e-5,
        atol=1e-5,
    )
    merged = keras_pvera.merge(model)
    assert isinstance(merged.get_layer("c2"), keras.layers.Conv2D)
    np.testing.assert_allclose(to_numpy(merged(x)), adapted, rtol=1e-5, atol=1e-5)
    # The adapter file, onto a fresh base, and the whole model.
    keras_pvera.save_adapter(model, str(tmp_path / "adapter"))
    loaded = keras_pvera.load_adapter(tiny_cnn(), str(tmp_path / "adapter"))
    np.testing.assert_allclose(to_numpy(loaded(x)), adapted, rtol=1e-6, atol=1e-6)
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(to_numpy(restored(x)), adapted, rtol=1e-6, atol=1e-6)


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
