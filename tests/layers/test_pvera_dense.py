import json

import keras
import numpy as np
import pytest
from builders import randomize_vectors
from builders import to_numpy
from conftest import SAVED_FILE_SETS
from conftest import needs_keras_3_15
from conftest import numpy_pvera
from conftest import saved_file
from keras import ops

from keras_pvera import PVeRADense


def adapter_arrays(layer):
    a, b = layer.projection_registry.projections(layer.in_dim, layer.out_dim)
    return (
        to_numpy(a),
        to_numpy(b),
        to_numpy(layer.lambda_d),
        to_numpy(layer.lambda_b),
    )


def test_trainable_weights_are_the_two_vectors():
    layer = PVeRADense(keras.layers.Dense(6), rank=8)
    layer.build((None, 5))
    assert [w.name for w in layer.trainable_weights] == [
        "pvera_lambda_d",
        "pvera_lambda_b",
    ]
    assert layer.lambda_d.shape == (16,) and layer.lambda_b.shape == (6,)
    np.testing.assert_allclose(to_numpy(layer.lambda_d), 0.1)
    np.testing.assert_array_equal(to_numpy(layer.lambda_b), 0.0)


@pytest.mark.parametrize("alpha", [1.0, 16.0])
def test_dense_mean_mode_equals_the_formula(alpha):
    base = keras.layers.Dense(6, activation="tanh")
    layer = PVeRADense(base, rank=4, alpha=alpha)
    x = np.random.default_rng(1).normal(size=(3, 7, 5)).astype("float32")
    layer.build(x.shape)
    randomize_vectors(layer)
    a, b, ld, lb = adapter_arrays(layer)
    expected, _ = numpy_pvera(
        x, to_numpy(base.kernel), to_numpy(base.bias), a, b, ld, lb, alpha
    )
    np.testing.assert_allclose(
        to_numpy(layer(x)), np.tanh(expected), rtol=1e-5, atol=1e-5
    )


# Each case: equation, input shape, output_shape, and how to see the layer
# as a Dense map: x -> (..., in), (..., out) -> y, kernel -> (in, out).
EINSUM_CASES = {
    "query": (
        "abc,cde->abde",
        (2, 3, 6),
        (None, 2, 4),
        lambda x: x,
        lambda y: y.reshape(y.shape[:-1] + (2, 4)),
        lambda k: k.reshape(6, 8),
    ),
    "attention_output": (
        "abcd,cde->abe",
        (2, 3, 2, 4),
        (None, 5),
        lambda x: x.reshape(x.shape[:2] + (8,)),
        lambda y: y,
        lambda k: k.reshape(8, 5),
    ),
    "plain": ("ab,bc->ac", (4, 6), (5,), lambda x: x, lambda y: y, lambda k: k),
    "ellipsis": (
        "...b,bc->...c",
        (2, 3, 6),
        (5,),
        lambda x: x,
        lambda y: y,
        lambda k: k,
    ),
    "transposed_kernel": (
        "abc,dc->abd",
        (2, 3, 6),
        (None, 5),
        lambda x: x,
        lambda y: y,
        lambda k: k.T,
    ),
}


@pytest.mark.parametrize("case", sorted(EINSUM_CASES))
def test_einsum_dense_mean_mode_equals_the_formula(case):
    equation, x_shape, output_shape, flat_x, unflat_y, flat_kernel = EINSUM_CASES[case]
    base = keras.layers.EinsumDense(
        equation, output_shape=output_shape, bias_axes=equation[-1]
    )
    x = np.random.default_rng(3).normal(size=x_shape).astype("float32")
    base.build(x_shape)
    layer = PVeRADense(base, rank=3, alpha=2.0)
    randomize_vectors(layer)
    a, b, ld, lb = adapter_arrays(layer)
    kernel = flat_kernel(to_numpy(base.kernel))
    assert (layer.in_dim, layer.out_dim) == kernel.shape
    expected, _ = numpy_pvera(flat_x(x), kernel, None, a, b, ld, lb, 2.0)
    expected = unflat_y(expected) + to_numpy(base.bias)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)
    # The folded kernel in the layer's own layout gives the same map.
    merged = to_numpy(base.kernel) + to_numpy(layer.delta_kernel())
    plain = np.einsum(equation, x, merged) + to_numpy(base.bias)
    np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-5)


# Equations for both inference paths: Dense's, KerasHub's query and attention
# output, a transposed kernel, and output dims that are not last in `y`.
PATH_CASES = {
    "dense": ("...a,ab->...b", (2, 3, 6), (5,), None),
    "query": ("abc,cde->abde", (2, 3, 6), (None, 2, 4), "de"),
    "attention_output": ("abcd,cde->abe", (2, 3, 2, 4), (None, 5), "e"),
    "transposed_kernel": ("abc,dc->abd", (2, 3, 6), (None, 5), "d"),
    "output_dims_not_last": ("abc,cd->adb", (2, 3, 6), (5, None), "d"),
}


def make_path_layer(case, **kwargs):
    equation, x_shape, output_shape, bias_axes = PATH_CASES[case]
    if case == "dense":
        base = keras.layers.Dense(output_shape[0])
    else:
        base = keras.layers.EinsumDense(
            equation, output_shape=output_shape, bias_axes=bias_axes
        )
    base.build(x_shape)
    rng = np.random.default_rng(9)
    base.bias.assign(rng.normal(size=base.bias.shape))
    layer = PVeRADense(base, rank=3, alpha=2.0, **kwargs)
    randomize_vectors(layer)
    return layer, rng.normal(size=x_shape).astype("float32")


@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_folded_path_equals_the_per_token_path_with_sampling_off(case):
    """Mean inference folds the adapter into the kernel; training and
    low-precision layers run it token by token: both give the same mean."""
    layer, x = make_path_layer(case)
    assert layer._folds(training=None)
    folded = to_numpy(layer(x))
    np.testing.assert_array_equal(folded, to_numpy(layer._folded_path(x)))
    per_token = to_numpy(layer._latent_path(layer.base_layer(x), x, training=False))
    # lambda_b is not zero: the adapter changes the output.
    assert np.abs(per_token - to_numpy(layer.base_layer(x))).max() > 1e-2
    np.testing.assert_allclose(folded, per_token, rtol=1e-5, atol=1e-5)


def test_output_dims_not_last_equal_the_formula_in_every_path():
    """`"abc,cd->adb"`: lambda_b cannot broadcast over `y`, so it scales B."""
    equation = "abc,cd->adb"
    layer, x = make_path_layer("output_dims_not_last", kl_weight=0.5)
    assert layer.linear.output_scale(layer.lambda_b) is None
    base = layer.base_layer
    kernel, bias = to_numpy(base.kernel), to_numpy(base.bias)
    a, b, ld, lb = adapter_arrays(layer)

    def formula(eps=None):
        # x (a, b, in) -> y (a, b, out) as for Dense, then laid out as "adb".
        flat, (mu, logvar) = numpy_pvera(x, kernel, None, a, b, ld, lb, 2.0, eps)
        return np.transpose(flat, (0, 2, 1)) + bias, (mu, logvar)

    mean, (mu, logvar) = formula()
    assert mean.shape == tuple(base(x).shape) == (2, 5, 3)
    assert not np.allclose(mean, np.einsum(equation, x, kernel) + bias, atol=1e-2)
    # Inference, sampling off: the folded kernel.
    np.testing.assert_allclose(to_numpy(layer(x)), mean, rtol=1e-5, atol=1e-5)

    def noise():
        return to_numpy(
            keras.random.normal(mu.shape, dtype="float32", seed=layer.seed_generator)
        )

    # Training: per token, with noise drawn from the layer's stream, and the
    # KL term of the formula.
    state = to_numpy(layer.seed_generator.state)
    trained = to_numpy(layer(x, training=True))
    layer.seed_generator.state.assign(state)
    expected, _ = formula(noise())
    np.testing.assert_allclose(trained, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(trained, mean, atol=1e-3)
    kl = np.mean(-0.5 * (1 + logvar - mu**2 - np.exp(logvar)))
    np.testing.assert_allclose(to_numpy(layer.losses[0]), 0.5 * kl, rtol=1e-5)
    # Inference with sampling on: the same per-token path, no KL term.
    layer.sample_at_inference = True
    state = to_numpy(layer.seed_generator.state)
    sampled = to_numpy(layer(x))
    layer.seed_generator.state.assign(state)
    expected, _ = formula(noise())
    np.testing.assert_allclose(sampled, expected, rtol=1e-5, atol=1e-5)
    assert layer.losses == []


def test_sampled_outputs_have_the_predicted_mean_and_variance():
    base = keras.layers.Dense(3)
    layer = PVeRADense(base, rank=4, alpha=1.5, seed=11)
    x = np.random.default_rng(4).normal(size=(1, 5)).astype("float32")
    layer.build(x.shape)
    randomize_vectors(layer, seed=5)
    a, b, ld, lb = adapter_arrays(layer)
    mean, (mu, logvar) = numpy_pvera(
        x, to_numpy(base.kernel), to_numpy(base.bias), a, b, ld, lb, 1.5
    )
    # y = mean + sum_k eps_k * sigma_k * alpha * lambda_b_o * B[o, k]
    weights = 1.5 * lb[:, None] * b[:3] * np.exp(0.5 * logvar)[0]
    variance = (weights**2).sum(axis=1)
    draws = 4000
    samples = to_numpy(layer(np.repeat(x, draws, axis=0), training=True))
    np.testing.assert_allclose(
        samples.mean(0), mean[0], atol=4 * np.sqrt(variance / draws).max()
    )
    np.testing.assert_allclose(samples.var(0), variance, rtol=0.1)
    # Every row drew its own noise.
    assert len(np.unique(samples[:, 0])) > 0.99 * draws


def test_inference_uses_the_mean_unless_sampling_is_on():
    layer = PVeRADense(keras.layers.Dense(3), rank=4)
    x = np.ones((2, 5), "float32")
    layer.build(x.shape)
    randomize_vectors(layer)
    np.testing.assert_array_equal(to_numpy(layer(x)), to_numpy(layer(x)))
    layer.sample_at_inference = True
    assert not np.allclose(to_numpy(layer(x)), to_numpy(layer(x)))


def test_dropout_applies_to_the_adapter_input_only():
    base = keras.layers.Dense(3)
    layer = PVeRADense(base, rank=4, dropout=0.5)
    x = np.random.default_rng(8).normal(size=(64, 5)).astype("float32")
    layer.build(x.shape)
    # lambda_b = 0: whatever dropout does to the adapter, y is the base's.
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)), to_numpy(base(x)), rtol=1e-6, atol=1e-6
    )
    randomize_vectors(layer)
    layer.lambda_d.assign(np.concatenate([np.ones(4), -30 * np.ones(4)]))
    # Almost no noise (logvar << 0): the training output is the mean of a
    # dropped-out input, which differs from the mean-mode output.
    assert not np.allclose(
        to_numpy(layer(x, training=True)), to_numpy(layer(x)), atol=1e-3
    )


def test_the_seed_makes_sampling_reproducible():
    def sample(seed):
        layer = PVeRADense(
            keras.layers.Dense(3, kernel_initializer="ones"), rank=4, seed=seed
        )
        layer.build((None, 5))
        randomize_vectors(layer)
        return to_numpy(layer(np.ones((2, 5), "float32"), training=True))

    np.testing.assert_array_equal(sample(1), sample(1))
    assert not np.allclose(sample(1), sample(2))


def test_the_noise_seed_chooses_the_noise_and_not_the_projections():
    def sample(noise_seed):
        layer = PVeRADense(
            keras.layers.Dense(3, kernel_initializer="ones"),
            rank=4,
            seed=1,
            noise_seed=noise_seed,
        )
        layer.build((None, 5))
        randomize_vectors(layer)
        x = np.ones((2, 5), "float32")
        return layer, to_numpy(layer(x, training=True))

    default, default_sample = sample(None)
    assert default.noise_seed == 1  # None takes the adapter's seed.
    other, other_sample = sample(9)
    np.testing.assert_array_equal(
        to_numpy(default.projection_registry.projection_a),
        to_numpy(other.projection_registry.projection_a),
    )
    assert not np.allclose(default_sample, other_sample)
    np.testing.assert_array_equal(sample(9)[1], other_sample)
    # A config written before `noise_seed` existed: its seed was the noise seed.
    old_config = other.get_config()
    del old_config["noise_seed"]
    assert PVeRADense.from_config(old_config).noise_seed == 1
    with pytest.raises(ValueError, match="noise_seed=-1"):
        PVeRADense(keras.layers.Dense(3), noise_seed=-1)


def test_config_round_trip_keeps_activation_and_settings():
    base = keras.layers.Dense(3, activation="relu", name="head")
    layer = PVeRADense(
        base,
        rank=4,
        alpha=2.0,
        d_initial=0.3,
        dropout=0.1,
        kl_weight=1e-3,
        sample_at_inference=True,
        seed=5,
    )
    config = layer.get_config()
    clone = PVeRADense.from_config(config)
    assert clone.get_config() == config
    assert clone.activation is keras.activations.relu
    assert clone.name == "head"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 4, "alpha": 0.0}, "alpha"),
        ({"rank": 4, "alpha": float("nan")}, "alpha"),
        ({"rank": 4, "d_initial": -1.0}, "d_initial"),
        ({"rank": 4, "dropout": 1.0}, "dropout"),
        ({"rank": 4, "kl_weight": -1e-9}, "kl_weight"),
    ],
)
def test_bad_settings_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PVeRADense(keras.layers.Dense(3), **kwargs)


def test_only_the_layer_kinds_pvera_adapts_can_be_wrapped():
    with pytest.raises(TypeError, match="DepthwiseConv2D"):
        PVeRADense(keras.layers.DepthwiseConv2D(3), rank=4)
    with pytest.raises(TypeError, match="PVeRAEmbedding"):
        PVeRADense(keras.layers.Embedding(10, 4), rank=4)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_latent_math_runs_in_float32_under_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    layer = PVeRADense(keras.layers.Dense(3), rank=2, kl_weight=1.0)
    x = np.ones((4, 5), "float32")
    layer.build(x.shape)
    layer.lambda_b.assign(np.full((3,), 1e-3))
    a, _, _, _ = adapter_arrays(layer)
    projected = (x[:1] @ a.T)[0]
    # logvar = 15 for every unit: exp(15) = 3.3e6 overflows float16.
    layer.lambda_d.assign(np.concatenate([np.zeros(2), 15.0 / projected[2:]]))
    y = layer(x, training=True)
    assert ops.convert_to_numpy(y).dtype == np.dtype(layer.compute_dtype)
    assert np.all(np.isfinite(to_numpy(ops.cast(y, "float32"))))
    kl = to_numpy(layer.losses[0])
    # The projection itself runs in the compute dtype (bfloat16: 3 digits).
    np.testing.assert_allclose(kl, np.mean(-0.5 * (1 + 15.0 - np.exp(15.0))), rtol=0.05)


def test_low_precision_layers_keep_the_adapter_unfolded():
    """A bfloat16 kernel would round a small folded delta away."""
    rng = np.random.default_rng(12)
    base = keras.layers.Dense(64, dtype="bfloat16", use_bias=False)
    base.build((None, 64))
    base.kernel.assign(rng.uniform(-0.1, 0.1, (64, 64)))
    layer = PVeRADense(base, rank=8)
    assert layer.compute_dtype == "bfloat16"
    assert layer.dropout_layer.compute_dtype == "bfloat16"
    layer.lambda_d.assign(rng.normal(0.0, 1.0, 16))
    layer.lambda_b.assign(np.full(64, 1e-3))
    x = rng.normal(size=(32, 64)).astype("float32")
    a, b, ld, lb = adapter_arrays(layer)
    expected, _ = numpy_pvera(x, np.zeros((64, 64)), None, a, b, ld, lb, 1.0)
    y = to_numpy(ops.cast(base(x), "float32"))
    out = layer(x)
    # PEFT's autocast: float32 vectors, the adapter in float32 on the input
    # as the base sees it, added to the base output, rounded once.
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert layer.lambda_d.dtype == "float32"
    x_seen = to_numpy(ops.cast(ops.cast(x, "bfloat16"), "float32"))
    expected, _ = numpy_pvera(x_seen, np.zeros((64, 64)), None, a, b, ld, lb, 1.0)
    rounded = to_numpy(ops.cast(ops.cast(y + expected, "bfloat16"), "float32"))
    ulp = np.abs(rounded) * 2.0**-7 + 1e-30  # one bfloat16 step at most
    assert np.all(np.abs(to_numpy(ops.cast(out, "float32")) - rounded) <= ulp)
    # A folded delta would be rounded into the kernel first, and mostly lost.
    effect = to_numpy(ops.cast(out, "float32")) - y
    assert np.corrcoef(effect.ravel(), expected.ravel())[0, 1] > 0.9


def test_a_layer_sharing_a_registry_survives_its_config():
    from keras_pvera import ProjectionRegistry

    registry = ProjectionRegistry(rank=2, in_max=16, out_max=16, seed=3)
    layer = PVeRADense(keras.layers.Dense(6), rank=2, projection_registry=registry)
    x = np.random.default_rng(13).normal(size=(4, 5)).astype("float32")
    layer.build(x.shape)
    randomize_vectors(layer)
    clone = PVeRADense.from_config(layer.get_config())  # built from config
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(layer(x)), atol=1e-6)


def test_dropout_and_noise_draw_from_distinct_streams():
    layer = PVeRADense(keras.layers.Dense(3), rank=2, dropout=0.5, seed=7)
    assert not np.array_equal(
        to_numpy(layer.dropout_layer.seed_generator.state),
        to_numpy(layer.seed_generator.state),
    )


@needs_keras_3_15
@pytest.mark.parametrize("version", SAVED_FILE_SETS)
def test_a_layer_config_written_by_an_earlier_version_still_loads(version):
    # 0.1.0 wrote the settings at the top level (one adapter, "default");
    # later versions per named adapter.
    with open(saved_file(version, "layer_config.json")) as f:
        layer = keras.saving.deserialize_keras_object(json.load(f))
    assert layer.adapter_names == ["default"]
    assert (layer.rank, layer.config.alpha, layer.config.kl_weight) == (4, 2.0, 1e-3)
    assert layer.activation is keras.activations.relu
    if not layer.built:
        layer.build((None, 6))
    assert [w.name for w in layer.trainable_weights] == [
        "pvera_lambda_d",
        "pvera_lambda_b",
    ]
