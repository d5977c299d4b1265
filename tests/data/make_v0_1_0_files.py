"""Writes the v0.1.0 files that tests/test_saving_compatibility.py loads.

Run once with keras_pvera 0.1.0 (commit 9de1eda) on the path:
`PYTHONPATH=<0.1.0 checkout> KERAS_BACKEND=torch python make_v0_1_0_files.py DIR`.
"""

import json
import sys

import keras
import numpy as np

import keras_pvera


def main(out):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(12, activation="relu", name="hidden")(inputs)
    h = keras.layers.Dense(12, activation="tanh", name="middle")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    base = keras.Model(inputs, outputs, name="old_mlp")
    model = keras_pvera.apply(
        base,
        rank=4,
        seed=5,
        alpha=2.0,
        kl_weight=1e-3,
        target=["hidden", "middle"],
        trainable_layers=["head"],
    )
    rng = np.random.default_rng(0)
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(rng.normal(size=layer.out_dim).astype("float32"))
        layer.lambda_d.assign(rng.normal(size=2 * layer.rank).astype("float32"))
    x = rng.normal(size=(4, 6)).astype("float32")
    model.save(f"{out}/v0_1_0_model.keras")
    keras_pvera.save_adapter(model, f"{out}/v0_1_0_adapter.safetensors")
    np.savez(f"{out}/v0_1_0_expected.npz", x=x, y=model.predict(x, verbose=0))
    layer = model.adapted_layers["hidden"]
    with open(f"{out}/v0_1_0_layer_config.json", "w") as f:
        json.dump(keras.saving.serialize_keras_object(layer), f)


if __name__ == "__main__":
    main(sys.argv[1])
