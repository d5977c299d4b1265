"""PVeRA on embeddings: the adapter of `onehot(token) @ E`, as a gather.

The Dense formula on one-hot rows, sampling, merging and the files are
checked for Embedding and a tied `ReversibleEmbedding` by the battery of
every adapted layer kind (tests/layers/test_adapted_layer_kinds.py); here,
masks, dropout and the reverse (logits) direction.
"""

import warnings

import keras
import numpy as np
import pytest
from builders import randomize_vectors
from builders import to_numpy

import keras_pvera
from keras_pvera import PVeRAEmbedding

VOCABULARY, DIM = 20, 6


def token_ids(seed=0, shape=(3, 5)):
    return np.random.default_rng(seed).integers(1, VOCABULARY, size=shape)


def numpy_delta(layer):
    """The mean delta `(vocab, dim)`, from the formula."""
    a, b = layer.projection_registry.projections(layer.in_dim, layer.out_dim)
    r = layer.rank
    a, b = to_numpy(a), to_numpy(b)
    ld, lb = to_numpy(layer.lambda_d), to_numpy(layer.lambda_b)
    return a[:r].T @ np.diag(ld[:r]) @ b.T @ np.diag(layer.config.alpha * lb)


def test_dropout_keeps_or_drops_each_token_whole():
    """A dropped one-hot input drops its one nonzero: a token's whole
    latent vector is zero or scaled by 1 / (1 - rate)."""
    layer = PVeRAEmbedding(keras.layers.Embedding(VOCABULARY, DIM), rank=4, dropout=0.5)
    ids = token_ids(shape=(8, 16))
    layer.build(ids.shape)
    full, _ = layer.latent(ids)
    dropped, _ = layer.latent(ids, training=True)
    full, dropped = to_numpy(full), to_numpy(dropped)
    kept = np.all(np.isclose(dropped, 2.0 * full, atol=1e-6), axis=-1)
    zero = np.all(dropped == 0.0, axis=-1)
    assert np.all(kept | zero)
    assert kept.any() and zero.any()


def tiny_text_model(mask_zero=True):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, DIM, mask_zero=mask_zero, name="emb")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_the_padding_mask_still_reaches_later_layers():
    """`mask_zero=True`: pooling averages over real tokens only, as in the
    base model (with the adapter at zero, outputs are equal)."""
    ids = token_ids()
    ids[:, 3:] = 0
    expected = to_numpy(tiny_text_model()(ids))
    model = keras_pvera.apply(tiny_text_model(), rank=4, target=["emb"])
    np.testing.assert_allclose(to_numpy(model(ids)), expected, rtol=1e-6, atol=1e-6)
    unmasked = to_numpy(tiny_text_model(mask_zero=False)(ids))
    assert np.abs(unmasked - expected).max() > 1e-3


def test_adapted_layers_carry_the_mask_as_the_layers_they_wrap():
    """An adapted Dense between a masking Embedding and a masked pooling
    supports masking as Dense does: Keras warns of no lost mask, and the
    pooling still averages over real tokens only."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, DIM, mask_zero=True, name="emb")(inputs)
    x = keras.layers.Dense(4, name="hidden")(x)
    outputs = keras.layers.GlobalAveragePooling1D()(x)
    base = keras.Model(inputs, outputs)
    ids = token_ids()
    ids[:, 3:] = 0
    expected = to_numpy(base(ids))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*destroy the mask")
        model = keras_pvera.apply(base, rank=2, target=["emb", "hidden"])
        got = model.predict(ids, verbose=0)
    for layer in model.adapted_layers.values():
        assert layer.supports_masking is layer.base_layer.supports_masking is True
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    unmasked = np.mean(
        to_numpy(base.get_layer("hidden")(base.get_layer("emb")(ids))), 1
    )
    assert np.abs(unmasked - expected).max() > 1e-3


def reversible_embedding(**kwargs):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    return keras_hub.layers.ReversibleEmbedding(VOCABULARY, DIM, **kwargs)


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_a_tied_reversible_embedding_is_adapted_in_both_directions(soft_cap):
    layer = PVeRAEmbedding(reversible_embedding(logit_soft_cap=soft_cap), rank=3)
    ids = token_ids()
    layer.build(ids.shape)
    randomize_vectors(layer)
    hidden = np.random.default_rng(1).normal(size=(3, 5, DIM)).astype("float32")
    adapted_matrix = to_numpy(layer.base_layer.embeddings) + numpy_delta(layer)
    logits = hidden @ adapted_matrix.T
    if soft_cap is not None:
        logits = np.tanh(logits / soft_cap) * soft_cap
    forward = to_numpy(layer(ids))
    reverse = to_numpy(layer(hidden, reverse=True))
    np.testing.assert_allclose(forward, adapted_matrix[ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reverse, logits, rtol=1e-5, atol=1e-5)
    # Merged into the matrix: the same in both directions.
    layer.merge()
    np.testing.assert_allclose(to_numpy(layer(ids)), forward, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer(hidden, reverse=True)), reverse, rtol=1e-5, atol=1e-5
    )
    # Adapters off while merged: the base layer in both directions.
    layer.adapter_enabled = False
    base = layer.base_layer
    base_logits = hidden @ (adapted_matrix - numpy_delta(layer)).T
    if soft_cap is not None:
        base_logits = np.tanh(base_logits / soft_cap) * soft_cap
    np.testing.assert_allclose(
        to_numpy(layer(hidden, reverse=True)), base_logits, rtol=1e-5, atol=1e-5
    )
    layer.unmerge()
    np.testing.assert_allclose(
        to_numpy(layer(hidden, reverse=True)),
        to_numpy(base(hidden, reverse=True)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_an_untied_reversible_embedding_keeps_its_reverse_matrix():
    layer = PVeRAEmbedding(reversible_embedding(tie_weights=False), rank=3)
    layer.build((3, 5))
    randomize_vectors(layer)
    hidden = np.random.default_rng(1).normal(size=(3, DIM)).astype("float32")
    np.testing.assert_array_equal(
        to_numpy(layer(hidden, reverse=True)),
        to_numpy(layer.base_layer(hidden, reverse=True)),
    )
