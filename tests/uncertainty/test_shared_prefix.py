"""Monte Carlo runs the layers before the first sampling layer once.

`predict_with_uncertainty` repeats each batch for its `n` passes only where
the first sampling layer needs it; everything before runs once per example.

Run: KERAS_BACKEND=torch python -m pytest tests/uncertainty/test_shared_prefix.py
"""

import warnings

import keras
import numpy as np
import pytest
from hub_models import sam
from hub_models import sam_inputs
from keras import ops
from pretrained_models import minilm_classifier

import keras_pvera
from keras_pvera.src.uncertainty import monte_carlo


class RowCounter(keras.layers.Layer):
    """Passes its input on and records how many rows each call had."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = []

    def call(self, x):
        if x.shape[0] is not None:  # Not a TensorFlow trace.
            self.rows.append(int(x.shape[0]))
        return x

    def compute_output_shape(self, input_shape):
        return input_shape  # Builds the model without calling `call`.


def counted_model(seed):
    """bottom -> [before] -> top -> [after] -> (skip + top) -> head, adapted
    on `bottom` and `top`, with a visible adapter (lambda_b = 1)."""
    features = keras.Input((6,))
    hidden = keras.layers.Dense(16, activation="relu", name="bottom")(features)
    hidden = RowCounter(name="before")(hidden)
    top = keras.layers.Dense(16, name="top")(hidden)
    top = RowCounter(name="after")(top)
    hidden = keras.layers.Add()([hidden, top])
    logits = keras.layers.Dense(3, name="head")(hidden)
    model = keras_pvera.apply(
        keras.Model(features, logits), rank=4, target=["bottom", "top"], seed=seed
    )
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(np.ones(layer.lambda_b.shape, "float32"))
    return model


def features(seed, size=10):
    return np.random.default_rng(seed).normal(size=(size, 6)).astype("float32")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sampled_layers", [None, ["top"]])
def test_samples_equal_the_repeated_batch_through_the_whole_model(seed, sampled_layers):
    model = counted_model(seed)
    x = features(seed)
    kwargs = dict(n=7, seed=seed, sampled_layers=sampled_layers, verbose=0)
    shared = keras_pvera.predict_with_uncertainty(
        model, x, return_samples=True, **kwargs
    )
    # The base model holds the same layers, but is not a model made by
    # `apply`: it gets the batch repeated at its inputs.
    repeated = keras_pvera.predict_with_uncertainty(
        model.base_model, x, return_samples=True, **kwargs
    )
    np.testing.assert_allclose(shared.samples, repeated.samples, atol=1e-5)
    # The passes differ: the check compares real samples.
    assert np.all(shared.std > 1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padding_masks_are_repeated_with_the_batch(seed):
    """Token ids -> embedding (mask_zero, run once) -> adapted Dense
    (sampling, repeated) -> masked average: the mask is repeated too."""
    ids = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Embedding(20, 8, mask_zero=True, name="embed")(ids)
    hidden = keras.layers.Dense(8, name="token_dense")(hidden)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    model = keras_pvera.apply(
        keras.Model(ids, keras.layers.Dense(2)(pooled)),
        rank=4,
        target=["token_dense"],
        seed=seed,
    )
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(np.ones(layer.lambda_b.shape, "float32"))
    x = np.random.default_rng(seed).integers(1, 20, size=(6, 5)).astype("int32")
    x[:, 3:] = 0  # Padding, which the average leaves out.
    kwargs = dict(n=5, seed=seed, verbose=0, return_samples=True)
    shared = keras_pvera.predict_with_uncertainty(model, x, **kwargs)
    repeated = keras_pvera.predict_with_uncertainty(model.base_model, x, **kwargs)
    np.testing.assert_allclose(shared.samples, repeated.samples, atol=1e-5)
    assert np.all(shared.std > 1e-4)


def test_layers_before_the_first_sampling_layer_see_each_example_once():
    model = counted_model(seed=0)
    before = model.base_model.get_layer("before")
    after = model.base_model.get_layer("after")
    x = features(0, size=10)
    model.run_eagerly = True  # The counters see every call, not a trace.
    # batch_size 32, n=8: 4 examples a call, each repeated 8 times.
    keras_pvera.predict_with_uncertainty(
        model, x, n=8, seed=0, sampled_layers=["top"], verbose=0
    )
    assert before.rows == [4, 4, 2]
    assert after.rows == [4 * 8, 4 * 8, 2 * 8]
    before.rows.clear()
    after.rows.clear()
    # With `bottom` sampling too, everything after it sees every copy.
    keras_pvera.predict_with_uncertainty(model, x, n=8, seed=0, verbose=0)
    assert before.rows == [4 * 8, 4 * 8, 2 * 8]


class RowTable(keras.layers.Layer):
    """One learned row, `(1, features)`, that its graph declares batched,
    as KerasHub's SAM prompt encoder declares its positional embeddings."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.table = self.add_weight(shape=(1, units))

    def call(self, x):
        return ops.convert_to_tensor(self.table)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.table.shape[1])


class AddRow(keras.layers.Layer):
    """`x` plus `row` broadcast to its batch, as SAM's mask decoder adds
    the positional embeddings."""

    def call(self, x, row):
        return x + ops.broadcast_to(row, ops.shape(x))

    def compute_output_shape(self, x_shape, row_shape):
        return x_shape


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_once_tensor_without_the_batch_runs_the_repeated_batch(seed):
    """The table's one row is computed once and read, beside the sampled
    `top`, by a layer that broadcasts it: repeating it would give it
    `n` rows, not the batch's. The whole model runs on the repeated
    batch instead, drawing the noise the walk drew again."""
    inputs = keras.Input((6,))
    top = keras.layers.Dense(16, name="top")(inputs)
    hidden = AddRow()(top, row=RowTable(16)(inputs))
    model = keras_pvera.apply(
        keras.Model(inputs, keras.layers.Dense(3)(hidden)),
        rank=4,
        target=["top"],
        seed=seed,
    )
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(np.ones(layer.lambda_b.shape, "float32"))
    x = features(seed, size=5)
    kwargs = dict(n=4, seed=seed, verbose=0, return_samples=True)
    shared = keras_pvera.predict_with_uncertainty(model, x, **kwargs)
    repeated = keras_pvera.predict_with_uncertainty(model.base_model, x, **kwargs)
    np.testing.assert_allclose(shared.samples, repeated.samples, atol=1e-5)
    assert np.all(shared.std > 1e-3)


# The torch run only (36 s on JAX): the fallback it takes runs on every
# backend in `test_a_once_tensor_without_the_batch_runs_the_repeated_batch`.
@pytest.mark.slow
@pytest.mark.default_backend_only
def test_keras_hub_sam_segmenter(monkeypatch):
    """KerasHub's `SAMImageSegmenter`: the image encoder samples, the
    prompt encoder's one-row positional embeddings meet its output in the
    mask decoder. The samples are those of the repeated batch."""
    keras_hub = pytest.importorskip("keras_hub")
    segmenter = keras_hub.models.SAMImageSegmenter(backbone=sam())
    with warnings.catch_warnings():
        # The image encoder's fused `qkv` projections, found by name.
        warnings.simplefilter("ignore")
        model = keras_pvera.apply(segmenter, rank=4, seed=0)
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(np.ones(layer.lambda_b.shape, "float32"))
    x = sam_inputs(2, 0)
    kwargs = dict(n=3, seed=0, verbose=0, return_samples=True)
    shared = keras_pvera.predict_with_uncertainty(model, x, **kwargs)
    monkeypatch.setattr(
        monte_carlo,
        "_shared_prefix_predictor",
        lambda model, sampling: monte_carlo._repeated_batch_predictor(model),
    )
    repeated = keras_pvera.predict_with_uncertainty(model, x, **kwargs)
    assert shared.samples["masks"].shape == (3, 2, 4, 8, 8)
    for key in ("masks", "iou_pred"):
        np.testing.assert_allclose(
            shared.samples[key], repeated.samples[key], atol=1e-5, err_msg=key
        )
        assert np.all(shared.std[key] > 0), key


SENTENCES = [
    "a fine film with a warm heart",
    "the plot drags and the jokes fall flat",
    "trains to the coast leave at noon",
    "what a waste of an evening",
    "the cast is wonderful",
]


@pytest.mark.slow
def test_a_keras_hub_classifier_runs_its_lower_layers_once(monkeypatch):
    """The real MiniLM `TextClassifier` with its preprocessor, on raw strings,
    sampling in its last transformer layer only: the first five layers run
    once per example, inside the task's backbone, and the samples are those
    of the repeated batch."""
    model = keras_pvera.apply(
        minilm_classifier(), rank=8, target=["query", "value"], seed=0
    )
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(np.full(layer.lambda_b.shape, 0.5, "float32"))
    last_layer = [p for p in model.adapted_layers if "transformer_layer_5" in p]
    first_block = model.backbone.get_layer("transformer_layer_0")
    rows = []
    block_call = first_block.call

    def counting_call(x, *args, **kwargs):
        rows.append(x.shape[0])
        return block_call(x, *args, **kwargs)

    monkeypatch.setattr(first_block, "call", counting_call)
    kwargs = dict(n=6, seed=0, sampled_layers=last_layer, verbose=0)
    shared = keras_pvera.predict_with_uncertainty(
        model, SENTENCES, return_samples=True, **kwargs
    )
    # batch_size 32, n=6: 5 examples in one call, repeated 6 times after.
    assert rows and set(rows) <= {5}
    assert shared.from_logits is True
    assert np.all(np.isfinite(shared.mutual_information()))
    # The same run with the repeated batch sent through the whole model.
    monkeypatch.setattr(
        monte_carlo,
        "_shared_prefix_predictor",
        lambda model, sampling: monte_carlo._repeated_batch_predictor(model),
    )
    repeated = keras_pvera.predict_with_uncertainty(
        model, SENTENCES, return_samples=True, **kwargs
    )
    assert set(rows) == {5, 30}
    np.testing.assert_allclose(shared.samples, repeated.samples, atol=1e-5)
    assert np.all(shared.std > 0)
