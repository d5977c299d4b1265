"""Throughput of several adapters in one batch against one after another.

A KerasHub GPT-2 decoder built from its constructor with random weights
(no download) holds `--adapters` PVeRA adapters on every attention and
feed-forward projection. A batch of token sequences, its examples spread
evenly over the adapters, is predicted three ways:
- in one batch, `model.predict(x, adapter_names=[...])`;
- one adapter after another, each on its own examples (`set_adapter`, then
  `predict`), as a service without per-row adapters would;
- for scale, the whole batch through one adapter (`predict` on the active
  adapter: what one batch costs with a single fine-tune).

Prints the median over `--repeats` timed runs after a warm-up run.

    KERAS_BACKEND=torch python benchmarks/benchmark_adapters_by_row.py
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_pvera  # noqa: E402


def decoder(args):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=args.vocabulary,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 64),
        hidden_dim=args.hidden,
        intermediate_dim=4 * args.hidden,
        max_sequence_length=args.length,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def adapted(args):
    """The decoder with `args.adapters` adapters, vectors as after training."""
    model = keras_pvera.apply(decoder(args), rank=args.rank, target="all", seed=0)
    names = ["default"] + [f"adapter_{i}" for i in range(1, args.adapters)]
    for name in names[1:]:
        model.add_adapter(name, rank=args.rank, seed=0, target="all")
    rng = np.random.default_rng(0)
    for layer in model.adapter_registry.wrappers.values():
        for vectors in layer.adapter_vectors.values():
            vectors.lambda_b.assign(rng.normal(0, 0.1, vectors.lambda_b.shape))
    return model, names


def median_seconds(run, repeats):
    run()  # Warm-up: compiles on JAX and TensorFlow.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocabulary", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny model")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.hidden, args.layers = 8, 8, 16, 1
        args.vocabulary, args.rank, args.repeats = 64, 4, 1

    model, names = adapted(args)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, args.vocabulary, (args.batch, args.length)),
        "padding_mask": np.ones((args.batch, args.length), bool),
    }
    per_row = [names[i % len(names)] for i in range(args.batch)]
    batch = args.batch

    def one_batch():
        return model.predict(x, adapter_names=per_row, batch_size=batch, verbose=0)

    def one_after_another():
        for name in names:
            rows = [i for i, n in enumerate(per_row) if n == name]
            part = {key: value[rows] for key, value in x.items()}
            model.set_adapter(name)
            model.predict(part, batch_size=batch, verbose=0)
        model.set_adapter("default")

    def single_adapter():
        return model.predict(x, batch_size=batch, verbose=0)

    # The figures compare the same work: check the outputs agree first.
    mixed = one_batch()
    for name in names:
        rows = [i for i, n in enumerate(per_row) if n == name]
        model.set_adapter(name)
        alone = model.predict({k: v[rows] for k, v in x.items()}, verbose=0)
        np.testing.assert_allclose(mixed[rows], alone, rtol=1e-3, atol=1e-3)
    model.set_adapter("default")

    figures = {
        "one batch, adapter_names": median_seconds(one_batch, args.repeats),
        "one adapter after another": median_seconds(one_after_another, args.repeats),
        "one adapter, whole batch": median_seconds(single_adapter, args.repeats),
    }
    params = model.base_model.backbone.count_params()
    print(
        f"GPT-2 decoder, {params / 1e6:.1f}M parameters, {len(names)} adapters "
        f"(rank {args.rank}, every projection), batch {batch} x {args.length} "
        f"tokens, backend {keras.config.backend()}, median of {args.repeats}"
    )
    print("| run | seconds | examples / s |")
    print("|---|---|---|")
    for run, seconds in figures.items():
        print(f"| {run} | {seconds:.3f} | {batch / seconds:.1f} |")
    speedup = figures["one adapter after another"] / figures["one batch, adapter_names"]
    print(f"one batch is {speedup:.2f}x as fast as one adapter after another")
    return figures


if __name__ == "__main__":
    main()
