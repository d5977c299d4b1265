"""Several adapters in one batch, at the layer: each row gets its adapter."""

import keras
import numpy as np
import pytest
from conftest import numpy_pvera
from keras import ops

from keras_pvera import PVeRAConfig
from keras_pvera import PVeRADense
from keras_pvera import PVeRAEmbedding
from keras_pvera.src.layers import row_adapters
from keras_pvera.src.layers.adapter_vectors import join_fused_group
from keras_pvera.src.layers.projections import ProjectionRegistry

NAMES = ("default", "other", "__base__")


def two_adapter_layer(base, seed, input_shape=(None, 3)):
    """A layer holding "default" and "other", with vectors as after training."""
    wrapper = PVeRAEmbedding if isinstance(base, keras.layers.Embedding) else PVeRADense
    layer = wrapper(base, rank=4, seed=seed)
    layer.build(input_shape)
    layer.add_adapter("other", PVeRAConfig(rank=4, seed=seed, alpha=3.0))
    rng = np.random.default_rng(seed)
    for vectors in layer.adapter_vectors.values():
        vectors.lambda_d.assign(rng.normal(0.0, 0.7, vectors.lambda_d.shape))
        vectors.lambda_b.assign(rng.normal(0.0, 0.7, vectors.lambda_b.shape))
    return layer


def alone(layer, name, x):
    """The layer's output with only adapter `name` active."""
    if name == "__base__":
        return ops.convert_to_numpy(layer.base_layer(x))
    layer.set_active_adapter(name)
    try:
        return ops.convert_to_numpy(layer(x))
    finally:
        layer.set_active_adapter("default")


def by_row(layer, x, indices):
    with row_adapters.selecting(NAMES, indices):
        return ops.convert_to_numpy(layer(x))


BASES = {
    "dense": (lambda: keras.layers.Dense(5), (6, 3)),
    # Dense on sequences: the rows' scales broadcast over positions.
    "dense_sequence": (lambda: keras.layers.Dense(5), (6, 4, 3)),
    "einsum": (
        lambda: keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3)),
        (6, 4, 3),
    ),
    # Output dims before the kept ones: the map lays out each row's scale.
    "einsum_output_first": (
        lambda: keras.layers.EinsumDense("abc,cd->adb", (5, 4)),
        (6, 4, 3),
    ),
    "conv2d": (lambda: keras.layers.Conv2D(4, 3, padding="same"), (6, 5, 5, 3)),
}


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_row_gets_what_its_adapter_alone_gives(kind, seed):
    make_base, shape = BASES[kind]
    layer = two_adapter_layer(make_base(), seed, (None, *shape[1:]))
    x = np.random.default_rng(seed).normal(size=shape).astype("float32")
    indices = np.array([0, 1, 2, 1, 0, 2], "int32")
    mixed = by_row(layer, x, indices)
    for i, name in enumerate(NAMES):
        rows = indices == i
        np.testing.assert_allclose(
            mixed[rows], alone(layer, name, x)[rows], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_equal_the_formula_with_each_adapters_vectors(seed):
    layer = two_adapter_layer(keras.layers.Dense(5), seed)
    x = np.random.default_rng(seed).normal(size=(6, 3)).astype("float32")
    indices = np.array([2, 0, 1, 1, 0, 2], "int32")
    mixed = by_row(layer, x, indices)
    kernel = ops.convert_to_numpy(layer.base_layer.kernel)
    bias = ops.convert_to_numpy(layer.base_layer.bias)
    projections = layer.projection_registry.projections(3, 5)
    a, b = (ops.convert_to_numpy(m) for m in projections)
    for i, name in enumerate(NAMES):
        rows = indices == i
        if name == "__base__":
            expected = x[rows] @ kernel + bias
        else:
            vectors = layer.adapter_vectors[name]
            expected, _ = numpy_pvera(
                x[rows],
                kernel,
                bias,
                a,
                b,
                ops.convert_to_numpy(vectors.lambda_d),
                ops.convert_to_numpy(vectors.lambda_b),
                vectors.config.alpha,
            )
        np.testing.assert_allclose(mixed[rows], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_rows_draw_the_noise_their_adapter_alone_would(seed):
    layer = two_adapter_layer(keras.layers.Dense(5), seed)
    layer.set_sampling_flags({"default": True, "other": True})
    x = np.random.default_rng(seed).normal(size=(6, 3)).astype("float32")
    indices = np.array([0, 1, 2, 1, 0, 2], "int32")
    start = ops.convert_to_numpy(layer.seed_generator.state.value)
    mixed = by_row(layer, x, indices)
    # The noise is real: a second draw moves the adapted rows, not the base's.
    again = by_row(layer, x, indices)
    assert np.abs(again[indices < 2] - mixed[indices < 2]).max() > 1e-3
    np.testing.assert_array_equal(again[indices == 2], mixed[indices == 2])
    for i, name in enumerate(NAMES):
        layer.seed_generator.state.assign(start)
        rows = indices == i
        np.testing.assert_allclose(
            mixed[rows], alone(layer, name, x)[rows], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("kind", ["dense", "einsum_output_first"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_of_adapters_reading_other_rows_of_b_get_their_own(kind, seed):
    """One adapter is part of a fused map (it reads `B` from row 7), the
    other is not; "other" samples: each row is still its adapter's alone."""
    make_base, shape = BASES[kind]
    registry = ProjectionRegistry(rank=4, in_max=3, out_max=12, seed=seed)
    layer = PVeRADense(make_base(), rank=4, seed=seed, projection_registry=registry)
    layer.build((None, *shape[1:]))
    layer.add_adapter("other", PVeRAConfig(rank=4, seed=seed, alpha=3.0))
    join_fused_group(layer, "other", 7)
    layer.set_sampling_flags({"other": True})
    rng = np.random.default_rng(seed)
    for vectors in layer.adapter_vectors.values():
        vectors.lambda_d.assign(rng.normal(0.0, 0.7, vectors.lambda_d.shape))
        vectors.lambda_b.assign(rng.normal(0.0, 0.7, vectors.lambda_b.shape))
    x = rng.normal(size=shape).astype("float32")
    indices = np.array([0, 1, 2, 1, 0, 2], "int32")
    start = ops.convert_to_numpy(layer.seed_generator.state.value)
    mixed = by_row(layer, x, indices)
    for i, name in enumerate(NAMES):
        layer.seed_generator.state.assign(start)
        rows = indices == i
        np.testing.assert_allclose(
            mixed[rows], alone(layer, name, x)[rows], rtol=1e-5, atol=1e-5
        )


def test_a_layer_without_a_batch_adapter_gives_the_base_output():
    layer = PVeRADense(keras.layers.Dense(5), rank=4)
    layer.build((None, 3))
    layer.lambda_b.assign(np.ones(5, "float32"))
    x = np.ones((2, 3), "float32")
    with row_adapters.selecting(("elsewhere", "__base__"), np.array([0, 1])):
        y = ops.convert_to_numpy(layer(x))
    np.testing.assert_array_equal(y, ops.convert_to_numpy(layer.base_layer(x)))


def test_rows_and_names_must_agree():
    layer = two_adapter_layer(keras.layers.Dense(5), 0)
    with pytest.raises(ValueError, match="received 3 rows but `adapter_names`"):
        by_row(layer, np.ones((3, 3), "float32"), np.array([0, 1], "int32"))


def test_picking_rows_is_for_inference():
    layer = two_adapter_layer(keras.layers.Dense(5), 0)
    with row_adapters.selecting(NAMES, np.array([0, 1])):
        with pytest.raises(ValueError, match="set_adapter"):
            layer(np.ones((2, 3), "float32"), training=True)


def test_index_rows_checks_the_names():
    loaded = ["default", "other"]
    names, indices = row_adapters.index_rows(
        ["other", "__base__", "other", "default"], loaded, num_examples=4
    )
    assert names == ("other", "__base__", "default")
    np.testing.assert_array_equal(indices, [0, 1, 0, 2])
    # Into a fixed order (every loaded adapter), the same for every call.
    names, indices = row_adapters.index_rows(
        ["other", "__base__", "other"], loaded, order=("__base__", *loaded)
    )
    assert names == ("other", "__base__")
    np.testing.assert_array_equal(indices, [2, 0, 2])
    with pytest.raises(ValueError, match="'missing'. Loaded adapters"):
        row_adapters.index_rows(["default", "missing"], loaded)
    with pytest.raises(ValueError, match="one name per example: 3 examples, 2"):
        row_adapters.index_rows(["default", "other"], loaded, num_examples=3)
    with pytest.raises(ValueError, match="one adapter name per example"):
        row_adapters.index_rows("default", loaded)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        row_adapters.index_rows(["default"], loaded, merged=["default"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embedding_rows_get_their_adapter_in_both_directions(seed):
    keras_hub = pytest.importorskip("keras_hub")
    base = keras_hub.layers.ReversibleEmbedding(20, 5)  # Tied weights.
    layer = two_adapter_layer(base, seed, (None, 4))
    ids = np.random.default_rng(seed).integers(0, 20, (6, 4)).astype("int32")
    h = np.random.default_rng(seed + 10).normal(size=(6, 4, 5)).astype("float32")
    indices = np.array([0, 1, 2, 1, 0, 2], "int32")
    with row_adapters.selecting(NAMES, indices):
        forward = ops.convert_to_numpy(layer(ids))
        logits = ops.convert_to_numpy(layer(h, reverse=True))
    for i, name in enumerate(NAMES):
        rows = indices == i
        if name == "__base__":
            expected = layer.base_layer(ids), layer.base_layer(h, reverse=True)
        else:
            layer.set_active_adapter(name)
            expected = layer(ids), layer(h, reverse=True)
            layer.set_active_adapter("default")
        np.testing.assert_allclose(
            forward[rows], ops.convert_to_numpy(expected[0])[rows], atol=1e-5
        )
        np.testing.assert_allclose(
            logits[rows], ops.convert_to_numpy(expected[1])[rows], atol=1e-5
        )
