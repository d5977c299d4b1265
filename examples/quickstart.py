"""keras_pvera in one minute, on scikit-learn's digits (no download).

A small Keras network is pretrained on digits 0-4 only. PVeRA then adapts it
to all ten digits, training two small vectors per hidden layer and the output
layer, while every hidden kernel stays frozen.

    KERAS_BACKEND=torch python examples/quickstart.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_pvera  # noqa: E402


def main(pretrain_epochs=20, adapt_epochs=30, verbose=0):
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )

    base = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", name="hidden_1"),
            keras.layers.Dense(128, activation="relu", name="hidden_2"),
            keras.layers.Dense(10, name="head"),
        ],
        name="digits_mlp",
    )
    base.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    seen = y_train < 5
    base.fit(
        x_train[seen],
        y_train[seen],
        epochs=pretrain_epochs,
        batch_size=64,
        verbose=verbose,
    )
    before = base.evaluate(x_test, y_test, verbose=0)[1]

    model = keras_pvera.apply(
        base, rank=64, target=["hidden_1", "hidden_2"], trainable_layers=["head"]
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=adapt_epochs, batch_size=64, verbose=verbose)
    after = model.evaluate(x_test, y_test, verbose=0)[1]

    trainable, total = model.parameter_counts()
    print(model.pvera_summary())
    print(f"test accuracy on all ten digits, pretrained on 0-4: {before:.3f}")
    print(
        f"test accuracy after PVeRA ({trainable:,} of {total:,} "
        f"parameters trained): {after:.3f}"
    )
    return before, after


if __name__ == "__main__":
    main(verbose=2)
