"""Tiny KerasHub models with random weights, built from constructor
arguments (nothing downloaded), that tests in several folders share.

Each builder skips the test when `keras-hub` is missing, and imports it
only when called (it imports TensorFlow).
"""

import keras
import numpy as np
import pytest


def sam():
    """A tiny `SAMBackbone` (32-pixel images, a 2x2 image embedding, one
    mask-decoder layer), the same weights every call."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    return keras_hub.models.SAMBackbone(
        image_encoder=keras_hub.models.ViTDetBackbone(
            hidden_size=16,
            num_layers=2,
            intermediate_dim=32,
            num_heads=2,
            global_attention_layer_indices=[1],
            patch_size=16,
            num_output_channels=8,
            window_size=2,
            image_shape=(32, 32, 3),
        ),
        prompt_encoder=keras_hub.layers.SAMPromptEncoder(
            hidden_size=8,
            image_embedding_size=(2, 2),
            input_image_size=(32, 32),
            mask_in_channels=16,
        ),
        mask_decoder=keras_hub.layers.SAMMaskDecoder(
            num_layers=1,
            hidden_size=8,
            intermediate_dim=16,
            num_heads=2,
            embedding_dim=8,
            num_multimask_outputs=3,
            iou_head_depth=2,
            iou_head_hidden_dim=8,
        ),
    )


def sam_inputs(rows, seed):
    """Images and prompts (a point, its label, a box, no mask) for `sam()`."""
    rng = np.random.default_rng(seed)
    return {
        "images": rng.uniform(size=(rows, 32, 32, 3)).astype("float32"),
        "points": rng.uniform(0, 32, (rows, 1, 2)).astype("float32"),
        "labels": np.ones((rows, 1), "float32"),
        "boxes": rng.uniform(0, 32, (rows, 1, 2, 2)).astype("float32"),
        "masks": np.zeros((rows, 0, 32, 32, 1), "float32"),
    }
