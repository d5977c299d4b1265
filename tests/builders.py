"""Small models, inputs and helpers that tests in several folders share.

Import them by name (`from builders import tiny_bert`): pytest puts tests/
on the path (pyproject.toml). The KerasHub builders skip the test when
`keras-hub` is missing, and import it only when called (it imports
TensorFlow). The architecture matrix's builders are in
tests/hub/hub_architectures.py; SAM's in tests/hub_models.py.
"""

import keras
import numpy as np
import pytest


def to_numpy(x):
    """A tensor of any backend as a NumPy array."""
    return keras.ops.convert_to_numpy(x)


def randomize_vectors(target, seed=0, scale=0.5):
    """Gives an adapted layer, or every adapted layer of a model, non-zero
    and non-constant vectors, as after training: `scale` times N(0, 1),
    `lambda_d` then `lambda_b` layer after layer, from one NumPy stream."""
    rng = np.random.default_rng(seed)
    layers = getattr(target, "adapted_layers", {"": target}).values()
    for layer in layers:
        layer.lambda_d.assign(rng.normal(0.0, scale, layer.lambda_d.shape))
        layer.lambda_b.assign(rng.normal(0.0, scale, layer.lambda_b.shape))
    return target


def adapter_vectors(model):
    """Every adapted layer's `lambda_d` and `lambda_b`, as one NumPy vector."""
    return np.concatenate(
        [
            to_numpy(w)
            for layer in model.adapted_layers.values()
            for w in (layer.lambda_d, layer.lambda_b)
        ]
    )


def small_mlp(name=None):
    """6 inputs, a `hidden` Dense of 8 (relu), a `head` of 3; seed 0."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="head"),
        ],
        name=name,
    )


# Sizes of the tiny BERT most tests use: 2 layers of width 8, 10 tokens.
TINY_BERT = dict(
    vocabulary_size=50,
    num_layers=2,
    num_heads=2,
    hidden_dim=8,
    intermediate_dim=16,
    max_sequence_length=10,
)
# A wider one (4 heads of 8), for checks of PEFT's per-head layouts.
PEFT_BERT = dict(
    vocabulary_size=100,
    num_layers=2,
    num_heads=4,
    hidden_dim=32,
    intermediate_dim=64,
    max_sequence_length=64,
)


def tiny_bert(seed=0, **arguments):
    """A KerasHub `BertBackbone` with random weights, nothing downloaded.

    `arguments` override `TINY_BERT`'s sizes (or add `name`, `dropout`...).
    `seed` fixes the weights (None keeps Keras' current random state).
    """
    keras_hub = pytest.importorskip("keras_hub")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras_hub.models.BertBackbone(**{**TINY_BERT, **arguments})


def tiny_bert_classifier(name=None):
    """`tiny_bert()` under a two-class `BertTextClassifier`, no preprocessor."""
    keras_hub = pytest.importorskip("keras_hub")
    return keras_hub.models.BertTextClassifier(
        backbone=tiny_bert(), num_classes=2, preprocessor=None, name=name
    )


def bert_inputs(n=8, seed=0, length=10, vocabulary_size=50):
    """`n` rows of random token ids for `tiny_bert()`: one segment, no padding."""
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, vocabulary_size, (n, length)).astype("int32"),
        "segment_ids": np.zeros((n, length), "int32"),
        "padding_mask": np.ones((n, length), "int32"),
    }


def peft_bert():
    """A wider `tiny_bert` (`PEFT_BERT`'s sizes), Keras' random state as is."""
    return tiny_bert(seed=None, **PEFT_BERT)
