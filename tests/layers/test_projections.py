import math

import keras
import numpy as np
import pytest

from keras_pvera import ProjectionRegistry
from keras_pvera import generate_projections


def test_same_seed_gives_bit_identical_projections():
    a1, b1 = generate_projections(seed=7, rank=16, in_max=64, out_max=32)
    a2, b2 = generate_projections(seed=7, rank=16, in_max=64, out_max=32)
    assert a1.tobytes() == a2.tobytes()
    assert b1.tobytes() == b2.tobytes()


def test_other_seed_gives_other_projections():
    a1, _ = generate_projections(seed=7, rank=4, in_max=8, out_max=8)
    a2, _ = generate_projections(seed=8, rank=4, in_max=8, out_max=8)
    assert not np.array_equal(a1, a2)


def test_projections_are_kaiming_uniform_float32():
    rank, in_max, out_max = 64, 300, 200
    a, b = generate_projections(seed=0, rank=rank, in_max=in_max, out_max=out_max)
    assert a.shape == (2 * rank, in_max) and b.shape == (out_max, rank)
    assert a.dtype == np.float32 and b.dtype == np.float32
    bound_a, bound_b = math.sqrt(6 / in_max), math.sqrt(6 / rank)
    assert np.abs(a).max() <= bound_a and np.abs(a).max() > 0.99 * bound_a
    assert np.abs(b).max() <= bound_b and np.abs(b).max() > 0.99 * bound_b
    # Uniform in [-bound, bound]: variance bound**2 / 3.
    np.testing.assert_allclose(a.var(), bound_a**2 / 3, rtol=0.02)
    np.testing.assert_allclose(b.var(), bound_b**2 / 3, rtol=0.02)


def test_registry_holds_the_generated_matrices_and_slices_them():
    registry = ProjectionRegistry(rank=4, in_max=10, out_max=6, seed=3)
    a, b = generate_projections(seed=3, rank=4, in_max=10, out_max=6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(registry.projection_a), a)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(registry.projection_b), b)
    a_slice, b_slice = registry.projections(in_dim=7, out_dim=5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(a_slice), a[:, :7])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(b_slice), b[:5])
    assert registry.trainable_weights == []


def test_registry_refuses_a_layer_larger_than_its_projections():
    registry = ProjectionRegistry(rank=4, in_max=10, out_max=6)
    with pytest.raises(ValueError, match="11 -> 6.*in_max"):
        registry.projections(in_dim=11, out_dim=6)


def test_registry_config_round_trip():
    registry = ProjectionRegistry(
        rank=4, in_max=10, out_max=6, seed=5, save_projection=False
    )
    clone = ProjectionRegistry.from_config(registry.get_config())
    assert clone.get_config() == registry.get_config()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(clone.projection_a),
        keras.ops.convert_to_numpy(registry.projection_a),
    )
