"""PVeRA on convolutions, on scikit-learn's digits (no download).

A small convolutional network (8x8 digit images -> Conv2D 16 -> Conv2D 32,
stride 2 -> flatten -> 5 classes) is pretrained on digits 0-4. It is then given a new
head for digits 5-9, trained from few labels (`--labels` per digit) in two
ways, with the convolution kernels frozen:

- the head alone (a linear probe of the pretrained features);
- the head, and PVeRA on both convolutions (`keras_pvera.apply(...,
  target=["conv_1", "conv_2"], trainable_layers=["head"])`): each kernel is
  adapted as the linear map from an image patch to the filters.

It prints both test accuracies, then predicts the test digits with Monte
Carlo sampling (`keras_pvera.predict_with_uncertainty`) and draws, for
twelve of them, the class probabilities with their 95% intervals over the
passes, into `--output-dir` (`digits_convolutions.png`). It needs
keras_pvera with one Keras backend, scikit-learn and matplotlib (about 40 s
of CPU time on torch, imports included).

    KERAS_BACKEND=torch python examples/digits_convolutions.py \
        [--output-dir outputs] [--seed 0]
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_pvera  # noqa: E402

RANK = 32
MC_SAMPLES = 30


def load_data(labels_per_digit, seed):
    """Digits 0-4 to pretrain on; digits 5-9 (as classes 0-4) with a few
    labels per digit to adapt on, and the rest to test on."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    old, new = y < 5, y >= 5
    x_new, y_new = x[new], y[new] - 5
    x_adapt, x_test, y_adapt, y_test = train_test_split(
        x_new,
        y_new,
        train_size=5 * labels_per_digit,
        random_state=seed,
        stratify=y_new,
    )
    return {
        "pretrain": (x[old], y[old]),
        "adapt": (x_adapt, y_adapt),
        "test": (x_test, y_test),
    }


def build_network(classes=5):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_1")(
        inputs
    )
    x = keras.layers.Conv2D(
        32, 3, strides=2, padding="same", activation="relu", name="conv_2"
    )(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def new_task_network(pretrained):
    """The pretrained convolutions with a new, untrained head."""
    network = build_network()
    for name in ("conv_1", "conv_2"):
        network.get_layer(name).set_weights(pretrained.get_layer(name).get_weights())
    return network


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def plot_intervals(result, x_test, y_test, path):
    """Twelve test digits and their class probabilities with 95% intervals."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5))
    axes = figure.subplots(2, 12, gridspec_kw={"height_ratios": [1, 1.4]})
    predicted = np.argmax(result.mean, -1)
    classes = np.arange(5)
    for column, i in enumerate(np.linspace(0, len(y_test) - 1, 12).astype(int)):
        image, bars = axes[0, column], axes[1, column]
        image.imshow(x_test[i, ..., 0], cmap="gray_r")
        image.set_xticks([])
        image.set_yticks([])
        right = predicted[i] == y_test[i]
        image.set_title(
            f"{y_test[i] + 5} -> {predicted[i] + 5}",
            color="black" if right else "tab:red",
            fontsize=9,
        )
        mean = result.mean[i]
        errors = [mean - result.lower[i], result.upper[i] - mean]
        bars.bar(classes, mean, yerr=errors, capsize=2, color="tab:blue")
        bars.set_ylim(0, 1)
        bars.set_xticks(classes, [str(c + 5) for c in classes], fontsize=7)
        if column:
            bars.set_yticks([])
    figure.suptitle(
        f"Digits 5-9 after PVeRA on the convolutions: true -> predicted, mean "
        f"probability per class and its {result.level:.0%} interval over "
        f"{result.n} Monte Carlo passes"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main(
    output_dir="outputs",
    seed=0,
    labels_per_digit=20,
    pretrain_epochs=10,
    adapt_epochs=30,
    mc_samples=MC_SAMPLES,
):
    """Runs the example; returns a dict of its figures and the PNG's path."""
    keras.utils.set_random_seed(seed)
    data = load_data(labels_per_digit, seed)
    x_test, y_test = data["test"]
    print(f"Pretraining on digits 0-4 ({keras.backend.backend()} backend)")
    pretrained = build_network()
    compile_model(pretrained, 3e-3)
    pretrained.fit(*data["pretrain"], epochs=pretrain_epochs, batch_size=32, verbose=0)

    probe = new_task_network(pretrained)
    for name in ("conv_1", "conv_2"):
        probe.get_layer(name).trainable = False
    compile_model(probe, 1e-2)
    probe.fit(*data["adapt"], epochs=adapt_epochs, batch_size=16, verbose=0)
    head_only = accuracy(probe, x_test, y_test)

    model = keras_pvera.apply(
        new_task_network(pretrained),
        rank=RANK,
        target=["conv_1", "conv_2"],
        trainable_layers=["head"],
        seed=seed,
    )
    compile_model(model, 1e-2)
    model.fit(*data["adapt"], epochs=adapt_epochs, batch_size=16, verbose=0)
    trained, total = model.parameter_counts()
    result = keras_pvera.predict_with_uncertainty(
        model, x_test, n=mc_samples, seed=seed, verbose=0
    )
    pvera = float(np.mean(np.argmax(result.mean, -1) == y_test))
    print(
        f"Digits 5-9 from {labels_per_digit} labels each, "
        f"{len(y_test)} test digits:\n"
        f"  new head alone:                   accuracy {head_only:.3f}\n"
        f"  new head + PVeRA on convolutions: accuracy {pvera:.3f} "
        f"(Monte Carlo mean, {trained:,} of {total:,} parameters train)"
    )
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "digits_convolutions.png")
    plot_intervals(result, x_test, y_test, path)
    print(f"PNG written to {os.path.abspath(path)}")
    return {
        "head only accuracy": head_only,
        "pvera accuracy": pvera,
        "trained": trained,
        "total": total,
        "mean interval width": float(np.mean(result.upper - result.lower)),
        "png": path,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(output_dir=args.output_dir, seed=args.seed)
