"""Many adapters in one call: keras_pvera's `adapter_names` beside PEFT's
mixed-adapter LoRA batch, at 1, 10, 100 and 1,000 adapters.

A GPT-2 decoder of about 100M parameters (12 layers, hidden size 768,
vocabulary 16,384), built from its constructor with random weights (no
download), twice:
- KerasHub's `GPT2CausalLM` with N PVeRA adapters (rank 32) on every
  attention and feed-forward projection (`target="all"`: query, key, value,
  attention output, both feed-forward layers);
- transformers' `GPT2LMHeadModel` from the same configuration with N PEFT
  LoRA adapters (rank 32) on the same projections (`c_attn`, which holds
  query, key and value, `c_proj` and `c_fc`).
Every adapter has random vectors (PVeRA) or matrices (LoRA), as after
training. `--rows` sequences of `--length` tokens, row `i` picking adapter
`i mod N`, are predicted in batches of `--batch` rows: keras_pvera with
`model.predict(x, adapter_names=names, batch_size=batch)`, PEFT with
`model(input_ids, adapter_names=names_of_the_batch)` per batch (PEFT's
mixed-adapter batch, under `torch.no_grad`). Before timing, each checks
that its rows equal what their adapters give alone.

`--mlp` runs issue 28's measurement instead (on any backend): a 3-layer,
1,024-wide MLP with 200 rank-32 adapters, `predict` on 4,096 rows with 200
adapter names against one name for every row.

Printed per N and library: the call's seconds (best of `--repeats`),
tokens per second, the adapters' own weights (MiB), and how far the
process's resident memory rose above its level before the call (Linux's
peak, `VmHWM`, reset before each call). PEFT runs only where its adapters'
weights fit in `--peft-max-gib`.

    KERAS_BACKEND=torch python benchmarks/benchmark_adapters_by_row.py
    KERAS_BACKEND=jax python benchmarks/benchmark_adapters_by_row.py --mlp
"""

import argparse
import gc
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_pvera  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]  # PEFT's names of `target="all"`.


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def timed(run, repeats):
    """`(best seconds, peak MiB rise)` of `repeats` runs (after the checked
    run, the warm-up: allocations, compilation on JAX and TensorFlow)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Resets the peak resident memory (`VmHWM`).
        before = status_kib("VmRSS")
    except OSError:
        before = None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    rise = None if before is None else (status_kib("VmHWM") - before) / 1024
    return min(times), rise


def float32_mib(variables):
    """The MiB of float32 `variables` (one shared by several counts once)."""
    unique = {id(v): v for v in variables}.values()
    return sum(int(np.prod(tuple(v.shape))) for v in unique) * 4 / 2**20


def keras_decoder(args):
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


def add_pvera_adapters(model, names, rank, rng):
    for name in names:
        if name not in model.adapter_names:
            model.add_adapter(name, rank=rank, seed=0, target="all")
    for layer in model.adapter_registry.wrappers.values():
        for name in names:
            vectors = layer.adapter_vectors[name]
            vectors.lambda_b.assign(rng.normal(0, 0.1, vectors.lambda_b.shape))


def run_keras_pvera(args, x, figures):
    model = keras_pvera.apply(keras_decoder(args), rank=args.rank, target="all")
    params = model.base_model.backbone.count_params()
    rng = np.random.default_rng(0)
    for count in args.adapters:
        names = ["default"] + [f"adapter_{i}" for i in range(1, count)]
        add_pvera_adapters(model, names, args.rank, rng)
        per_row = [names[i % count] for i in range(args.rows)]

        def call(per_row=per_row):
            return model.predict(
                x, adapter_names=per_row, batch_size=args.batch, verbose=0
            )

        # Each row is what its adapter gives alone (a few adapters checked).
        mixed = call()
        for name in names[:3]:
            rows = [i for i, n in enumerate(per_row) if n == name]
            model.set_adapter(name)
            alone = model.predict({k: v[rows] for k, v in x.items()}, verbose=0)
            np.testing.assert_allclose(mixed[rows], alone, rtol=1e-3, atol=1e-3)
        model.set_adapter("default")
        seconds, rise = timed(call, args.repeats)
        vectors = [
            w
            for layer in model.adapter_registry.wrappers.values()
            for v in layer.adapter_vectors.values()
            for w in v.weights
        ]
        figures["keras_pvera PVeRA", count] = (seconds, float32_mib(vectors), rise)
    return params


def peft_gpt2(args):
    """A random GPT-2 of the benchmark's size with PEFT's LoRA, and the
    LoRA config that adds each further adapter."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=args.vocabulary,
        n_positions=args.length,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=max(1, args.hidden // 64),
        bos_token_id=0,
        eos_token_id=0,
    )
    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        target_modules=TARGETS,
        fan_in_fan_out=True,  # GPT-2's Conv1D layers.
        init_lora_weights=False,  # Random A and B, as after training.
    )
    base = transformers.GPT2LMHeadModel(config).eval()
    return peft.get_peft_model(base, lora, adapter_name="default"), lora


def peft_rows_call(model, ids, per_row, args):
    """Predicts every row with its own adapter (`adapter_names`)."""
    import torch

    def call():
        outputs = []
        with torch.no_grad():
            for start in range(0, args.rows, args.batch):
                stop = start + args.batch
                logits = model(
                    input_ids=ids[start:stop], adapter_names=per_row[start:stop]
                ).logits
                outputs.append(logits.numpy())
        return np.concatenate(outputs)

    return call


def check_peft_rows(model, ids, per_row, mixed, names):
    """Each of the first adapters' rows equal that adapter alone."""
    import torch

    for name in names[:3]:
        rows = [i for i, n in enumerate(per_row) if n == name]
        model.set_adapter(name)
        with torch.no_grad():
            alone = model(input_ids=ids[rows]).logits.numpy()
        np.testing.assert_allclose(mixed[rows], alone, rtol=1e-3, atol=1e-3)
    model.set_adapter("default")


def run_peft(args, x, figures):
    import torch

    model, lora = peft_gpt2(args)
    ids = torch.as_tensor(x["token_ids"])
    per_adapter = None
    for count in args.adapters:
        names = ["default"] + [f"adapter_{i}" for i in range(1, count)]
        if per_adapter is not None and per_adapter * count > args.peft_max_gib * 1024:
            print(
                f"PEFT, {count} adapters: not run, their weights would take "
                f"{per_adapter * count / 1024:.1f} GiB (--peft-max-gib "
                f"{args.peft_max_gib})"
            )
            continue
        for name in names:
            if name not in model.peft_config:
                model.add_adapter(name, lora)
        model.eval()  # PEFT refuses `adapter_names` in training mode.
        per_row = [names[i % count] for i in range(args.rows)]
        call = peft_rows_call(model, ids, per_row, args)
        check_peft_rows(model, ids, per_row, call(), names)
        seconds, rise = timed(call, args.repeats)
        lora_weights = [p for n, p in model.named_parameters() if "lora_" in n]
        mib = float32_mib(lora_weights)
        per_adapter = mib / count
        figures["PEFT LoRA", count] = (seconds, mib, rise)


def run_mlp(args):
    """The issue's measurement: 200 adapter names against one, on an MLP.

    A 3-layer, 1,024-wide MLP (random weights) with `--mlp-adapters`
    rank-32 PVeRA adapters, 4,096 rows: `predict` with one adapter name per
    row, cycling over all adapters, against the same call with one name for
    every row (both through the per-row path); best of `--repeats`,
    alternated. Returns the two times.
    """
    keras.utils.set_random_seed(0)
    width, rows = (16, 32) if args.quick else (1024, 4096)
    base = keras.Sequential(
        [keras.Input((width,))]
        + [keras.layers.Dense(width, activation="relu") for _ in range(2)]
        + [keras.layers.Dense(width)]
    )
    model = keras_pvera.apply(base, rank=args.rank, target="all", seed=0)
    names = ["default"] + [f"adapter_{i}" for i in range(1, args.mlp_adapters)]
    add_pvera_adapters(model, names, args.rank, np.random.default_rng(0))
    x = np.random.default_rng(0).normal(size=(rows, width)).astype("float32")
    runs = {
        "one name": ["default"] * rows,
        f"{len(names)} names": [names[i % len(names)] for i in range(rows)],
    }
    mixed = model.predict(x, adapter_names=runs[f"{len(names)} names"], verbose=0)
    for i, name in enumerate(names[:3]):  # Rows i, i + N, ...: adapter i.
        model.set_adapter(name)
        alone = model.predict(x[i :: len(names)], verbose=0)
        np.testing.assert_allclose(mixed[i :: len(names)], alone, rtol=1e-4, atol=1e-4)
    model.set_adapter("default")
    times = {run: [] for run in runs}
    for _ in range(1 + args.repeats):  # The first round warms up.
        for run, per_row in runs.items():
            start = time.perf_counter()
            model.predict(x, adapter_names=per_row, verbose=0)
            times[run].append(time.perf_counter() - start)
    best = {run: min(seconds[1:]) for run, seconds in times.items()}
    one, many = best.values()
    print(
        f"MLP {width} x 3 Dense ({len(model.adapted_layers)} adapted), "
        f"{len(names)} adapters of rank {args.rank}, {rows} rows, default "
        f"batch size; backend {keras.config.backend()}, best of "
        f"{args.repeats} alternated: one name {one:.3f} s, {len(names)} names "
        f"{many:.3f} s, ratio {many / one:.2f}"
    )
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--length", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocabulary", type=int, default=16384)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peft-max-gib", type=float, default=4.0)
    parser.add_argument("--no-peft", action="store_true", help="keras_pvera only")
    parser.add_argument(
        "--mlp", action="store_true", help="the MLP measurement of issue 28 only"
    )
    parser.add_argument("--mlp-adapters", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a tiny model")
    args = parser.parse_args(argv)
    if args.quick:
        args.adapters, args.rows, args.batch, args.length = [1, 4], 8, 4, 4
        args.hidden, args.layers, args.vocabulary = 16, 1, 64
        args.rank, args.repeats, args.mlp_adapters = 4, 1, 4
    if args.mlp:
        return run_mlp(args)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, args.vocabulary, (args.rows, args.length)),
        "padding_mask": np.ones((args.rows, args.length), bool),
    }
    figures = {}
    params = run_keras_pvera(args, x, figures)
    gc.collect()
    if not args.no_peft and keras.config.backend() == "torch":
        run_peft(args, x, figures)
    tokens = args.rows * args.length
    print(
        f"GPT-2 decoder, {params / 1e6:.1f}M parameters, rank {args.rank} on "
        f"every attention and feed-forward projection; {args.rows} rows x "
        f"{args.length} tokens, row i with adapter i mod N, batches of "
        f"{args.batch}; backend {keras.config.backend()}, best of {args.repeats}"
    )
    print(
        "| adapters N | library | seconds | tokens / s | adapters MiB | peak rise MiB |"
    )
    print("|---|---|---|---|---|---|")
    for (library, count), (seconds, mib, rise) in sorted(
        figures.items(), key=lambda item: (item[0][1], item[0][0])
    ):
        rise = "n/a" if rise is None else f"{rise:,.0f}"
        print(
            f"| {count:,} | {library} | {seconds:.2f} | {tokens / seconds:,.0f} "
            f"| {mib:,.1f} | {rise} |"
        )
    return figures


if __name__ == "__main__":
    main()
