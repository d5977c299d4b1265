"""keras_pvera in a few minutes, on scikit-learn's digits (no download).

A small Keras network (8x8 digit images -> 128 -> 128 -> 7 classes) is
pretrained on digits 0-3 only. It is then adapted to digits 0-6 from few
labels (20 per digit) in three ways, with the hidden kernels frozen and the
output layer trained each time:

- PVeRA (`keras_pvera.apply`, rank 64), predicting with Monte Carlo sampling
  (30 passes): the mean probability, a 95% interval, mutual information;
- the same PVeRA model with sampling off (one deterministic pass);
- Keras' own LoRA (`layer.enable_lora(1)`) at a similar parameter budget.

The printed table compares accuracy, expected calibration error (ECE),
negative log-likelihood (NLL) and out-of-distribution detection: the AUROC of
separating the test digits 0-6 from digits 7-9 (never seen in training) and
from uniform noise images, scored by mutual information (the epistemic part
of the uncertainty; zero for a deterministic model) and by predictive
entropy. PNGs (reliability diagrams, uncertainty histograms, a grid of test
digits with their 95% intervals) go to `--output-dir`. `--seed` picks the
data split, the few labels, the weights and the noise.

It needs keras_pvera with one Keras backend, scikit-learn and matplotlib
(no TensorFlow, KerasHub or Hugging Face package on torch or JAX). It prints
a line per stage and the table.

    KERAS_BACKEND=torch python examples/quickstart.py [--output-dir outputs] [--seed 0]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The network is tiny: one thread per operation is as fast, and on shared
# cores torch's OpenMP threads, waiting on each other, made it 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_pvera  # noqa: E402

PRETRAIN_CLASSES = 4  # digits 0-3
TASK_CLASSES = 7  # digits 0-6; 7-9 are out of distribution
LABELS_PER_CLASS = 20
RANK = 64
LORA_RANK = 1
MC_SAMPLES = 30


class FitProgress(keras.callbacks.Callback):
    """One progress bar for a whole `fit`, advancing once an epoch.

    On a terminal it redraws in place; in a pipe or a log it prints one line
    when the fit ends.
    """

    def on_train_begin(self, logs=None):
        self.bar = keras.utils.Progbar(
            self.params["epochs"],
            verbose=1 if sys.stdout.isatty() else 2,
            stateful_metrics=["loss", "accuracy"],
            unit_name="epoch",
        )

    def on_epoch_end(self, epoch, logs=None):
        self.bar.update(epoch + 1, values=list((logs or {}).items()))


def load_data(seed=0):
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.4, random_state=seed, stratify=y
    )
    rng = np.random.default_rng(seed)
    few = np.concatenate(
        [
            rng.choice(np.flatnonzero(y_train == c), LABELS_PER_CLASS, replace=False)
            for c in range(TASK_CLASSES)
        ]
    )
    in_test = y_test < TASK_CLASSES
    noise = rng.uniform(0.0, 1.0, size=(int(in_test.sum()), 64)).astype("float32")
    return {
        "pretrain": (
            x_train[y_train < PRETRAIN_CLASSES],
            y_train[y_train < PRETRAIN_CLASSES],
        ),
        "adapt": (x_train[few], y_train[few]),
        "test": (x_test[in_test], y_test[in_test]),
        "held_out": x_test[~in_test],
        "noise": noise,
    }


def build_base():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", name="hidden_1"),
            keras.layers.Dense(128, activation="relu", name="hidden_2"),
            keras.layers.Dense(TASK_CLASSES, activation="softmax", name="head"),
        ],
        name="digits_mlp",
    )


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def entropy(p):
    return -np.sum(p * np.log(np.clip(p, 1e-12, 1.0)), axis=-1)


def scores(y, probabilities, mi=None, held_out=None, noise=None):
    """Accuracy, ECE, NLL and OOD AUROCs (`held_out`/`noise`: (mi, probs))."""
    row = {
        "accuracy": float(np.mean(np.argmax(probabilities, -1) == y)),
        "ECE": float(keras_pvera.expected_calibration_error(y, probabilities)),
        "NLL": float(
            -np.mean(np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1)))
        ),
    }
    for name, (ood_mi, ood_p) in (("7-9", held_out), ("noise", noise)):
        labels = np.r_[np.zeros(len(y)), np.ones(len(ood_p))]
        row[f"AUROC {name} MI"] = (
            None if mi is None else float(roc_auc_score(labels, np.r_[mi, ood_mi]))
        )
        row[f"AUROC {name} entropy"] = float(
            roc_auc_score(labels, np.r_[entropy(probabilities), entropy(ood_p)])
        )
    return row


def format_table(rows):
    columns = [c for c in next(iter(rows.values())) if c != "trained"]
    header = ["method", "trained params", *columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for name, row in rows.items():
        cells = [name, f"{row['trained']:,}"]
        for column in columns:
            value = row[column]
            cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plots(output_dir, data, pvera, lora_probabilities, ood):
    from matplotlib.figure import Figure

    x_test, y_test = data["test"]
    paths = {}
    paths["reliability PVeRA (MC)"] = keras_pvera.reliability_diagram(
        y_test, pvera.mean, os.path.join(output_dir, "reliability_pvera_mc.png")
    )
    paths["reliability Keras LoRA"] = keras_pvera.reliability_diagram(
        y_test, lora_probabilities, os.path.join(output_dir, "reliability_lora.png")
    )

    figure = Figure(figsize=(9, 3.4))
    for axes, key, xlabel in zip(
        figure.subplots(1, 2),
        ("mi", "entropy"),
        ("mutual information (nats)", "predictive entropy (nats)"),
        strict=True,
    ):
        top = max(values.max() for values in ood[key].values())
        bins = np.linspace(0.0, top, 31)
        for label, values in ood[key].items():
            axes.hist(values, bins=bins, alpha=0.5, density=True, label=label)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("density")
        axes.legend()
    figure.suptitle("PVeRA, 30 Monte Carlo passes: in vs out of distribution")
    figure.tight_layout()
    paths["uncertainty histogram"] = os.path.join(output_dir, "uncertainty_ood.png")
    figure.savefig(paths["uncertainty histogram"], dpi=100)

    predicted = pvera.predicted_class
    rows = np.arange(len(y_test))
    confidence = pvera.mean[rows, predicted]
    wrong = np.flatnonzero(predicted != y_test)
    # The 12 least confident correct predictions and up to 12 mistakes.
    right = np.flatnonzero(predicted == y_test)
    shown = np.r_[right[np.argsort(confidence[right])][:12], wrong[:12]]
    shown = np.r_[shown, right[np.argsort(-confidence[right])]][:24]
    figure = Figure(figsize=(12, 8.5))
    for axes, i in zip(figure.subplots(4, 6).ravel(), shown, strict=True):
        axes.imshow(x_test[i].reshape(8, 8), cmap="gray_r")
        axes.set_xticks([])
        axes.set_yticks([])
        c = predicted[i]
        axes.set_title(
            f"pred {c} (true {y_test[i]})\n"
            f"p={pvera.mean[i, c]:.2f} [{pvera.lower[i, c]:.2f}, "
            f"{pvera.upper[i, c]:.2f}]",
            fontsize=9,
            color="black" if c == y_test[i] else "tab:red",
        )
    figure.suptitle(
        "Test digits: predicted class, mean probability and its 95% interval "
        "over 30 passes (red: wrong)"
    )
    figure.tight_layout()
    paths["digit grid"] = os.path.join(output_dir, "digits_intervals.png")
    figure.savefig(paths["digit grid"], dpi=100)
    return paths


def main(
    pretrain_epochs=30,
    adapt_epochs=60,
    output_dir="outputs",
    mc_samples=MC_SAMPLES,
    seed=0,
):
    """Runs the comparison; returns `(accuracy_before, rows, png_paths)`."""
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    data = load_data(seed)
    x_test, y_test = data["test"]
    os.makedirs(output_dir, exist_ok=True)
    print(f"keras_pvera quickstart ({keras.backend.backend()} backend, seed {seed})")

    print(f"Pretraining on digits 0-{PRETRAIN_CLASSES - 1}, {pretrain_epochs} epochs:")
    base = build_base()
    compile_model(base, 1e-3)
    base.fit(
        *data["pretrain"],
        epochs=pretrain_epochs,
        batch_size=64,
        verbose=0,
        callbacks=[FitProgress()],
    )
    before = float(np.mean(np.argmax(base.predict(x_test, verbose=0), -1) == y_test))
    base_weights = base.get_weights()

    model = keras_pvera.apply(
        base,
        rank=RANK,
        target=["hidden_1", "hidden_2"],
        trainable_layers=["head"],
        seed=seed,
    )
    compile_model(model, 3e-3)
    pvera_trained, total = model.parameter_counts()
    print(
        f"Adapting to digits 0-{TASK_CLASSES - 1} from {LABELS_PER_CLASS} labels "
        f"per digit with PVeRA (rank {RANK}, {len(model.adapted_layers)} adapted "
        f"layers; {pvera_trained:,} of {total:,} parameters train), "
        f"{adapt_epochs} epochs:"
    )
    model.fit(
        *data["adapt"],
        epochs=adapt_epochs,
        batch_size=16,
        verbose=0,
        callbacks=[FitProgress()],
    )

    def mc(x):
        return keras_pvera.predict_with_uncertainty(
            model, x, n=mc_samples, seed=seed, batch_size=4096, verbose=0
        )

    stage = time.perf_counter()
    pvera, held_out, noise = mc(x_test), mc(data["held_out"]), mc(data["noise"])
    inputs = {"test": x_test, "held_out": data["held_out"], "noise": data["noise"]}
    print(
        f"Predicted with {mc_samples} Monte Carlo passes over "
        f"{sum(len(x) for x in inputs.values()):,} inputs in "
        f"{time.perf_counter() - stage:.1f} s"
    )
    rows = {}
    rows["PVeRA, Monte Carlo"] = {
        "trained": pvera_trained,
        **scores(
            y_test,
            pvera.mean,
            pvera.mutual_information(),
            held_out=(held_out.mutual_information(), held_out.mean),
            noise=(noise.mutual_information(), noise.mean),
        ),
    }
    off = {k: model.predict(x, verbose=0) for k, x in inputs.items()}
    rows["PVeRA, sampling off"] = {
        "trained": pvera_trained,
        **scores(
            y_test,
            off["test"],
            held_out=(None, off["held_out"]),
            noise=(None, off["noise"]),
        ),
    }

    print(
        f"Adapting with Keras LoRA (enable_lora({LORA_RANK})), {adapt_epochs} epochs:"
    )
    lora = build_base()
    lora.set_weights(base_weights)
    for layer in lora.layers:
        layer.trainable = layer.name == "head"
    for name in ("hidden_1", "hidden_2"):
        layer = lora.get_layer(name)
        layer.trainable = True
        layer.enable_lora(LORA_RANK)
        layer.bias.trainable = False  # as PVeRA: only the low-rank part trains
    compile_model(lora, 3e-3)
    lora.fit(
        *data["adapt"],
        epochs=adapt_epochs,
        batch_size=16,
        verbose=0,
        callbacks=[FitProgress()],
    )
    lora_trained = sum(int(np.prod(w.shape)) for w in lora.trainable_weights)
    lora_p = {k: lora.predict(x, verbose=0) for k, x in inputs.items()}
    rows[f"Keras LoRA, rank {LORA_RANK}"] = {
        "trained": lora_trained,
        **scores(
            y_test,
            lora_p["test"],
            held_out=(None, lora_p["held_out"]),
            noise=(None, lora_p["noise"]),
        ),
    }

    ood = {
        "mi": {
            "test digits 0-6": pvera.mutual_information(),
            "digits 7-9": held_out.mutual_information(),
            "noise": noise.mutual_information(),
        },
        "entropy": {
            "test digits 0-6": pvera.predictive_entropy(),
            "digits 7-9": held_out.predictive_entropy(),
            "noise": noise.predictive_entropy(),
        },
    }
    paths = save_plots(output_dir, data, pvera, lora_p["test"], ood)

    print(
        f"\nTest accuracy on digits 0-{TASK_CLASSES - 1} of the model pretrained "
        f"on 0-{PRETRAIN_CLASSES - 1}: {before:.3f}"
    )
    print(
        f"Adapted from {len(data['adapt'][0])} labelled digits; "
        f"{len(y_test)} test digits, {len(data['held_out'])} digits 7-9, "
        f"{len(data['noise'])} noise images; MI: mutual information, "
        f"{mc_samples} passes ('n/a': a deterministic model has none)\n"
    )
    print(format_table(rows))
    print(f"\nPNGs written to {os.path.abspath(output_dir)}:")
    for label, path in paths.items():
        print(f"  {label}: {os.path.basename(path)}")
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return before, rows, paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(output_dir=args.output_dir, seed=args.seed)
