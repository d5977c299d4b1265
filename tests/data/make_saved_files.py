"""Writes the saved files that the tests load to check old files still work.

Each set was written once by the keras_pvera it is named after, on the
torch backend with Keras 3.15, with that checkout first on the path:
`PYTHONPATH=<checkout> KERAS_BACKEND=torch python make_saved_files.py DIR PREFIX`.

- `v0_1_0_*`: keras_pvera 0.1.0 (commit 9de1eda).
- `main_2026_11_29_*`: main at commit 6fb9bf3, before the package moved
  into `keras_pvera/src/` (the layout of its classes' modules changed).
"""

import json
import sys

import keras
import numpy as np

import keras_pvera


def main(out, prefix):
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
    model.save(f"{out}/{prefix}_model.keras")
    keras_pvera.save_adapter(model, f"{out}/{prefix}_adapter.safetensors")
    np.savez(f"{out}/{prefix}_expected.npz", x=x, y=model.predict(x, verbose=0))
    layer = model.adapted_layers["hidden"]
    with open(f"{out}/{prefix}_layer_config.json", "w") as f:
        json.dump(keras.saving.serialize_keras_object(layer), f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
