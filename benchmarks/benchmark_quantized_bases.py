"""PVeRA and Keras' LoRA on float32, int8 and int4 bases: memory and step time.

    KERAS_BACKEND=torch python benchmarks/benchmark_quantized_bases.py
    KERAS_BACKEND=torch python benchmarks/benchmark_quantized_bases.py --quick

A KerasHub `GPT2CausalLM` of GPT-2 small's size (12 blocks, hidden size 768,
vocabulary 50,257: 124M parameters), built from its constructor arguments
with random weights (nothing downloaded), is trained for a few steps on
random token ids (next-token loss, Adam) in six ways: its base float32,
quantized with Keras' `model.quantize("int8")` or `model.quantize("int4")`
(per output channel), each adapted with keras_pvera (`apply`, rank 256,
the default targets: query and value) or with Keras' own LoRA
(`backbone.enable_lora(4)`, query and value). `--quick` builds a two-block
model of hidden size 64 instead, for a run of seconds.

For each, the table gives:

- `weights MiB`: the bytes of every variable of the model (base kernels in
  their stored dtype, scales, embeddings, adapter vectors and projections),
  exact;
- `trainable`: the number of trained values;
- `step s`: the median time of a training step (`train_on_batch`) over
  `--steps` steps after `--warmup` steps;
- `step peak MiB`: how far the process's resident memory rose above its
  level before the timed steps (Linux's `VmHWM`, reset through
  `/proc/self/clear_refs` before them): the activations, gradients and
  optimizer state of training, on top of the weights. Resident memory, not
  allocations: pages freed by the allocator and reused do not count twice,
  and pages the allocator keeps from an earlier combination may hide some.
  `n/a` where the kernel does not allow the reset.

The combinations run one after the other in one process, each on a model
built afresh.
"""

import argparse
import datetime
import gc
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_pvera  # noqa: E402

GPT2_SMALL = dict(
    vocabulary_size=50257,
    num_layers=12,
    num_heads=12,
    hidden_dim=768,
    intermediate_dim=3072,
    max_sequence_length=1024,
)
QUICK = dict(
    vocabulary_size=512,
    num_layers=2,
    num_heads=2,
    hidden_dim=64,
    intermediate_dim=128,
    max_sequence_length=64,
)
BASES = ("float32", "int8", "int4")
METHODS = ("PVeRA", "Keras LoRA")


def build_causal_lm(size):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(**size)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def training_batch(size, batch, seq):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, size["vocabulary_size"], (batch, seq + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((batch, seq), bool)}
    return x, ids[:, 1:]


def prepared(size, base, method, rank, lora_rank):
    """The causal LM on `base`, adapted with `method`, compiled."""
    causal_lm = build_causal_lm(size)
    if base != "float32":
        causal_lm.quantize(base)
    if method == "PVeRA":
        model = keras_pvera.apply(causal_lm, rank=rank)
    else:
        causal_lm.backbone.enable_lora(lora_rank)
        model = causal_lm
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def weight_bytes(model):
    # A variable shared by several layers (a tied embedding) counts once.
    unique = {id(v): v for v in model.weights}.values()
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in unique)


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss():
    """Resets Linux's peak resident memory (`VmHWM`); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(model, x, y, steps, warmup):
    for _ in range(warmup):
        model.train_on_batch(x, y)
    gc.collect()
    resettable = reset_peak_rss()
    before = status_kib("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    peak = status_kib("VmHWM") if resettable else None
    rise = None if peak is None or before is None else (peak - before) / 1024
    return statistics.median(times), rise


def run(size, batch, seq, steps, warmup, rank, lora_rank):
    """`{(base, method): figures}` for every base and method."""
    x, y = training_batch(size, batch, seq)
    rows = {}
    for base in BASES:
        for method in METHODS:
            model = prepared(size, base, method, rank, lora_rank)
            trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
            step, rise = measure(model, x, y, steps, warmup)
            rows[base, method] = {
                "weights MiB": weight_bytes(model) / 2**20,
                "trainable": trainable,
                "step s": step,
                "step peak MiB": rise,
            }
            del model
            gc.collect()
    return rows


def table(rows):
    lines = [
        "| base | method | weights MiB | trainable | step s | step peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for (base, method), r in rows.items():
        rise = "n/a" if r["step peak MiB"] is None else f"{r['step peak MiB']:,.0f}"
        lines.append(
            f"| {base} | {method} | {r['weights MiB']:,.1f} | "
            f"{r['trainable']:,} | {r['step s']:.3f} | {rise} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=256, help="PVeRA's rank")
    parser.add_argument("--lora-rank", type=int, default=4)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else GPT2_SMALL
    seq = min(args.seq, 16) if args.quick else args.seq
    steps, warmup = (1, 1) if args.quick else (args.steps, args.warmup)
    rank = min(args.rank, 8) if args.quick else args.rank
    start = time.time()
    rows = run(size, args.batch, seq, steps, warmup, rank, args.lora_rank)
    print(
        f"GPT2CausalLM {size}, batch {args.batch} x {seq} tokens, PVeRA r={rank}, "
        f"LoRA r={args.lora_rank}, median of {steps} steps after {warmup}; "
        f"{keras.config.backend()} backend, keras {keras.version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.time() - start:.0f} s"
    )
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
