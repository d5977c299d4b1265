"""What `PVeRAConfig(max_log_variance=...)` changes, in and out of distribution.

The tabular task of the held-out study (`benchmarks/research/uncertainty_heldout.py`):
an MLP (2 hidden layers of 64) on scikit-learn `make_classification` data
(20 features, 8 classes), pretrained on classes 0-3, then adapted to 0-5
from 15 rows a class with PVeRA's recipe (`d_initial=3`, rank 16, both
hidden layers, head trained in full, 40 epochs). Each seed trains the
adapter without a bound and with each bound asked for, from the same
start, then:

- scores the test rows of classes 0-5 with `keras_pvera.evaluate_uncertainty`
  (accuracy, NLL, Brier, ECE with 15 bins, AURC; the mean predictor and the
  Monte Carlo one, `n` passes);
- counts the non-finite sampled output values (`predict_with_uncertainty`,
  same `n` and seed) on the test rows, on them scaled by 4 (the held-out
  study's "far rows") and by 100;
- reports the largest latent log-variance of the adapted layers on the test
  rows in mean passes (each layer fed its mean-mode input) and in sampled
  passes (the second layer fed the first's sampled output), the share of
  the sampled values above each bound (without a bound), and whether the
  trained vectors and head equal the unbounded run's bit for bit.

    OMP_NUM_THREADS=1 KERAS_BACKEND=torch \\
        python benchmarks/research/log_variance_bound.py
        [--seeds 3] [--bounds 10,20,40] [--n 30] [--quick]

`--quick` (one seed, 5 epochs, 4 passes) takes seconds.
"""

import argparse
import datetime
import platform
import time
import warnings

import keras
import numpy as np
from keras import ops
from uncertainty_heldout import OPTIONS
from uncertainty_heldout import TabularTask
from uncertainty_heldout import fit_model
from uncertainty_heldout import new_pvera
from uncertainty_heldout import tabular_rows

import keras_pvera

METRICS = ("accuracy", "nll", "brier", "ece", "aurc")
PREDICTORS = ("mean", "monte_carlo")
SCALES = (1.0, 4.0, 100.0)  # the test rows, scaled
TARGETS = TabularTask.targets
RECIPE = OPTIONS["recipe"][0]  # d_initial=3 (the task's rank, 16)


def train(task, seed, bound):
    """The held-out study's recipe with `max_log_variance=bound`, trained
    as the study trains it."""
    model = new_pvera(task, {**RECIPE, "max_log_variance": bound}, seed)
    return fit_model(model, task, seed)


def largest_log_variance(model, x):
    """The largest latent log-variance of the adapted layers on `x`, each
    layer fed its mean-mode input."""
    largest = -np.inf
    h = ops.convert_to_tensor(x)
    for layer in model.base_model.layers:
        if layer.name in TARGETS:
            logvar = ops.convert_to_numpy(layer.latent(h)[1])
            largest = max(largest, float(logvar.max()))
        h = layer(h)
    return largest


class LogVarianceRecorder:
    """Keeps every latent log-variance the adapted layers compute (as the
    noise uses it) while the model predicts (wraps `latent` on the
    instances; the torch backend runs it eagerly)."""

    def __init__(self, model):
        self.layers = [model.adapted_layers[path] for path in TARGETS]
        self.values = []

    def __enter__(self):
        for layer in self.layers:
            original = layer.latent

            def latent(*args, original=original, **kwargs):
                mu, logvar = original(*args, **kwargs)
                self.values.append(ops.convert_to_numpy(logvar).ravel())
                return mu, logvar

            layer.latent = latent
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.latent


def non_finite_share(model, x, n, seed):
    """The share of sampled output values that are infinite or NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = keras_pvera.predict_with_uncertainty(
            model, x, n=n, seed=seed, return_samples=True, batch_size=512, verbose=0
        )
    samples = np.asarray(result.samples)
    return float(np.mean(~np.isfinite(samples)))


def run_seed(seed, bounds, n, quick):
    task = TabularTask(seed, quick)
    # Scored on every test row of the adapted classes (the study's
    # calibration rows included).
    x_test, y_test = tabular_rows(seed, task.classes)[0]["known"]
    rows, vectors = {}, {}
    for bound in (None, *bounds):
        model = train(task, seed, bound)
        vectors[bound] = [np.asarray(w) for w in model.trainable_weights]
        report = keras_pvera.evaluate_uncertainty(
            model, x_test, y_test, n=n, seed=seed, from_logits=True
        )
        row = {p: {m: report.metrics[p][m] for m in METRICS} for p in PREDICTORS}
        row["largest logvar"] = largest_log_variance(model, x_test)
        for scale in SCALES:
            with LogVarianceRecorder(model) as recorder:
                share = non_finite_share(model, scale * x_test, n, seed)
            row[f"x{scale:g}"] = share
            if scale == 1.0:
                logvar = np.concatenate(recorder.values)
                row["largest sampled logvar"] = float(logvar.max())
                row["above"] = {b: float(np.mean(logvar > b)) for b in bounds}
        row["same weights"] = all(
            np.array_equal(a, b)
            for a, b in zip(vectors[None], vectors[bound], strict=True)
        )
        rows[bound] = row
        print(
            f"seed {seed} max_log_variance={bound}: "
            + ", ".join(f"{p} {m} {row[p][m]:.4f}" for p in PREDICTORS for m in METRICS)
            + "; largest logvar on test rows: mean passes "
            + f"{row['largest logvar']:.2f}, sampled passes "
            + f"{row['largest sampled logvar']:.2f}; sampled logvar values above "
            + ", ".join(f"{b:g}: {share:.2e}" for b, share in row["above"].items())
            + "; "
            + ", ".join(f"non-finite x{s:g} {row[f'x{s:g}']:.1%}" for s in SCALES)
            + f"; weights equal the unbounded run's: {row['same weights']}",
            flush=True,
        )
    return rows


def table(results, bounds):
    """Mean over seeds, as a Markdown table."""
    lines = [
        "| max_log_variance | predictor | "
        + " | ".join(METRICS)
        + "".join(f" | non-finite x{s:g}" for s in SCALES)
        + " |",
        "|---" * (len(METRICS) + 2 + len(SCALES)) + "|",
    ]
    for bound in (None, *bounds):
        for p in PREDICTORS:
            cells = [
                f"{np.mean([r[bound][p][m] for r in results]):.4f}" for m in METRICS
            ]
            far = [
                f"{np.mean([r[bound][f'x{s:g}'] for r in results]):.1%}" for s in SCALES
            ]
            lines.append(
                f"| {bound} | {p} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(far)
                + " |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bounds", default="10,20,40")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    bounds = tuple(float(b) for b in args.bounds.split(","))
    seeds = range(1 if args.quick else args.seeds)
    n = 4 if args.quick else args.n
    started = time.perf_counter()
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"keras_pvera {keras_pvera.__version__}, Keras {keras.__version__} "
        f"({keras.backend.backend()}), Python {platform.python_version()}, "
        f"seeds {list(seeds)}, n={n}"
    )
    results = [run_seed(seed, bounds, n, args.quick) for seed in seeds]
    print()
    print(table(results, bounds))
    for bound in bounds:
        largest = max(r[None]["largest logvar"] for r in results)
        sampled = max(r[None]["largest sampled logvar"] for r in results)
        above = np.mean([r[None]["above"][bound] for r in results])
        differences = max(
            abs(r[bound][p][m] - r[None][p][m])
            for r in results
            for p in PREDICTORS
            for m in METRICS
        )
        same = all(r[bound]["same weights"] for r in results)
        print(
            f"max_log_variance={bound}: without a bound, the test rows' largest "
            f"log-variance is {largest:.2f} in mean passes and {sampled:.2f} in "
            f"sampled ones, where a share {above:.2e} of the values is above "
            f"{bound:g}; trained weights equal the unbounded run's on "
            f"every seed: {same}; largest change of an in-distribution figure: "
            f"{differences:.2g}"
        )
    print(f"{time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
