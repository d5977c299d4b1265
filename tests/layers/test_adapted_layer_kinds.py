"""The battery every kind of adapted layer runs (tests/layer_battery.py):
Dense, EinsumDense, Conv1D/2D/3D, Embedding and KerasHub's tied
ReversibleEmbedding, each in a tiny model (the layer, then a Dense head).

1. a new adapter computes the base model; with trained vectors, the layer
   computes PVeRA's formula in NumPy on its Dense map, in the mean and
   sampled with the noise the layer draws, and adds the formula's KL term
   while training; its merged delta is the formula's, and `merge` gives
   the adapted model's outputs;
2. the adapter file (onto a fresh base) and the `.keras` file round trip;
3. what cannot be adapted is refused, naming what would be right.
"""

import keras
import numpy as np
import pytest
from builders import randomize_vectors
from builders import to_numpy
from conftest import numpy_pvera
from layer_battery import DIM
from layer_battery import KINDS
from layer_battery import numpy_kl

import keras_pvera
from keras_pvera import PVeRADense
from keras_pvera import PVeRAEmbedding
from keras_pvera import kl_divergence

ALPHA, KL_WEIGHT, TOLERANCE = 2.0, 0.5, 1e-4


def runs_here(kind):
    if kind.name.endswith("channels_first") and keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow's CPU convolutions only run channels_last")


def new_adapted(kind):
    """`kind`'s model adapted (the layer and the head), vectors as created."""
    return keras_pvera.apply(
        kind.model(),
        rank=3,
        alpha=ALPHA,
        kl_weight=KL_WEIGHT,
        target=["adapted", "head"],
    )


def adapted(kind):
    """`kind`'s model adapted (the layer and the head) with trained vectors."""
    return randomize_vectors(new_adapted(kind))


def numpy_delta(layer):
    """The mean delta `(in, out)` of PVERA.md's merging formula."""
    a, b = layer.projection_registry.projections(layer.in_dim, layer.out_dim)
    a, b, r = to_numpy(a), to_numpy(b), layer.rank
    ld, lb = to_numpy(layer.lambda_d), to_numpy(layer.lambda_b)
    return a[:r].T @ np.diag(ld[:r]) @ b.T @ np.diag(layer.config.alpha * lb)


def formula(layer, kind, x, eps=None):
    """The layer's output and latent by the Dense formula on its rows."""
    rows, kernel, bias, layout = kind.as_dense(layer.base_layer, x)
    a, b = layer.projection_registry.projections(layer.in_dim, layer.out_dim)
    y, latent = numpy_pvera(
        rows,
        kernel,
        bias,
        to_numpy(a),
        to_numpy(b),
        to_numpy(layer.lambda_d),
        to_numpy(layer.lambda_b),
        layer.config.alpha,
        eps=eps,
    )
    return layout(y), latent, kernel


def assert_close(actual, expected, tolerance=TOLERANCE):
    np.testing.assert_allclose(
        to_numpy(actual), expected, rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_the_layer_computes_the_formula_samples_adds_kl_and_merges(kind):
    runs_here(kind)
    x = kind.inputs()
    expected_base = to_numpy(kind.model()(x))
    model = new_adapted(kind)
    # A new adapter (lambda_b = 0) computes the base model.
    np.testing.assert_array_equal(to_numpy(model(x)), expected_base)
    layer, head = model.adapted_layers["adapted"], model.adapted_layers["head"]
    assert isinstance(layer, PVeRAEmbedding if kind.tokens else PVeRADense)
    assert [w.name for w in layer.trainable_weights] == [
        "pvera_lambda_d",
        "pvera_lambda_b",
    ]
    assert layer.in_dim == kind.in_dim
    # One pair of projections for the model, as large as its largest layer.
    registry = layer.projection_registry
    assert head.projection_registry is registry
    assert registry.in_max == max(layer.in_dim, head.in_dim)
    assert registry.out_max == max(layer.out_dim, head.out_dim)

    randomize_vectors(model)
    expected, (mu, logvar), kernel = formula(layer, kind, x)
    assert np.abs(expected - to_numpy(layer.base_layer(x))).max() > 1e-2
    assert_close(layer(x), expected)
    assert layer.losses == []  # no KL term at inference
    got_mu, got_logvar = layer.latent(x)
    assert_close(got_mu, mu)
    assert_close(got_logvar, logvar)
    # Sampling (training), with the noise the layer draws; and the KL term.
    state = to_numpy(layer.seed_generator.state)
    sampled = to_numpy(layer(x, training=True))
    layer.seed_generator.state.assign(state)
    eps = to_numpy(keras.random.normal(mu.shape, seed=layer.seed_generator))
    assert_close(sampled, formula(layer, kind, x, eps=eps)[0])
    assert not np.allclose(sampled, expected, atol=1e-3)
    assert len(layer.losses) == 1
    kl = numpy_kl(mu, logvar)
    assert_close(kl_divergence(got_mu, got_logvar), kl)
    assert_close(layer.losses[0], KL_WEIGHT * kl)
    # The merged delta, in the kernel's own layout, is the formula's.
    delta = numpy_delta(layer)
    assert_close(to_numpy(layer.delta_kernel()).reshape(kernel.shape), delta)
    if kind.tied:
        # The logits read the adapted matrix too: h @ (E + dE).T, capped.
        hidden = np.random.default_rng(1).normal(size=(2, 5, DIM)).astype("float32")
        cap = layer.base_layer.logit_soft_cap
        logits = np.tanh(hidden @ (kernel + delta).T / cap) * cap
        assert_close(layer(hidden, reverse=True), logits)
    # `merge` folds every adapter into its kernel: the base model's classes,
    # the adapted model's outputs.
    outputs = to_numpy(model(x))
    merged = keras_pvera.merge(model)
    assert type(merged.get_layer("adapted")) is type(layer.base_layer)
    assert_close(merged(x), outputs)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_the_adapter_file_and_the_keras_file_round_trip(kind, tmp_path):
    runs_here(kind)
    model = adapted(kind)
    x = kind.inputs()
    outputs = to_numpy(model(x))
    keras_pvera.save_adapter(model, str(tmp_path / "adapter"))
    loaded = keras_pvera.load_adapter(kind.model(), str(tmp_path / "adapter"))
    assert_close(loaded(x), outputs, 1e-6)
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert type(restored.adapted_layers["adapted"]) is type(
        model.adapted_layers["adapted"]
    )
    assert_close(restored(x), outputs, 1e-6)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_what_cannot_be_adapted_is_refused_naming_what_would_be_right(kind):
    base = kind.build()
    right, wrong = (
        (PVeRAEmbedding, PVeRADense) if kind.tokens else (PVeRADense, PVeRAEmbedding)
    )
    with pytest.raises(TypeError, match=f"use {right.__name__}|in a {right.__name__}"):
        wrong(base, rank=2)
    with pytest.raises(ValueError, match="rank=0"):
        right(base, rank=0)
    with pytest.raises(TypeError, match=f"is a {right.__name__}"):
        PVeRADense(right(base, rank=2), rank=2)
