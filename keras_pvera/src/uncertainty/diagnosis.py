"""Does a model's Monte Carlo spread mean anything? A diagnostic to run.

Switching sampling on always gives a spread; whether it is informative
depends on the task and the training. `diagnose_uncertainty` measures, on
a user's own inputs:

- how much spread the sampling produces (mean mutual information, in nats,
  for class outputs; mean variance of the samples for other outputs), and
  how much of it each adapted layer produces when it samples alone;
- with out-of-distribution inputs, whether the spread ranks them above the
  in-distribution ones (AUROC: 0.5 is chance, 1 perfect, below 0.5
  inverted), beside the predictive entropy of the same passes;

and says so in a plain verdict.
"""

import dataclasses

import keras
import numpy as np

from keras_pvera.src.uncertainty import metrics
from keras_pvera.src.uncertainty.monte_carlo import predict_with_uncertainty
from keras_pvera.src.uncertainty.sampled_model import read_model
from keras_pvera.src.uncertainty.statistics import UncertaintyResult

# Below this mean spread the passes agree to rounding: mutual information of
# 1e-4 nats is a disagreement of about 1% in one class probability.
NEGLIGIBLE_SPREAD = 1e-4
# AUROC bands of the verdict.
SEPARATES = 0.7
WEAKLY_SEPARATES = 0.6
INVERTED = 0.4


@dataclasses.dataclass
class UncertaintyDiagnosis:
    """What `diagnose_uncertainty` measured.

    Attributes:
        measure: `"mutual_information"` (class outputs, nats) or
            `"variance"` (other outputs), the spread measured.
        in_distribution_spread: The spread of each in-distribution input,
            all adapted layers sampling.
        out_of_distribution_spread: The same for the out-of-distribution
            inputs, or `None`.
        layer_spread: `{path: mean in-distribution spread}` with only that
            layer sampling.
        auroc: How well the spread ranks out-of-distribution inputs above
            in-distribution ones (0.5: chance), or `None`.
        entropy_auroc: The same for predictive entropy (class outputs), or
            `None`.
        verdict: A plain sentence or two saying what the figures mean.
    """

    measure: str
    in_distribution_spread: np.ndarray
    out_of_distribution_spread: object
    layer_spread: dict
    auroc: object
    entropy_auroc: object
    verdict: str

    @property
    def layer_shares(self):
        """`{path: share}`: each layer's spread alone over their sum."""
        total = sum(self.layer_spread.values())
        if total <= 0:
            return {path: 0.0 for path in self.layer_spread}
        return {path: value / total for path, value in self.layer_spread.items()}

    def plot(self, path):
        """Writes the diagnosis as a PNG: the spread of each set, and of
        each layer sampling alone. Needs matplotlib.

        Args:
            path: Where to write the PNG file.

        Returns:
            `path`.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError(
                "UncertaintyDiagnosis.plot needs matplotlib: install it with "
                '`pip install "keras-pvera[plot]"`.'
            ) from e
        figure = Figure(figsize=(10, 4))
        spread_axes, layer_axes = figure.subplots(1, 2)
        sets = [("in distribution", self.in_distribution_spread)]
        if self.out_of_distribution_spread is not None:
            sets.append(("out of distribution", self.out_of_distribution_spread))
        values = np.concatenate([v for _, v in sets])
        bins = np.linspace(0.0, max(float(values.max()), 1e-12), 30)
        for label, spread in sets:
            spread_axes.hist(spread, bins=bins, alpha=0.5, label=label)
        spread_axes.set_xlabel(self.measure.replace("_", " "))
        spread_axes.set_ylabel("inputs")
        title = "spread per input"
        if self.auroc is not None:
            title += f" (AUROC {self.auroc:.2f})"
        spread_axes.set_title(title)
        spread_axes.legend()
        paths = list(self.layer_spread)
        layer_axes.barh(range(len(paths)), [self.layer_spread[p] for p in paths])
        layer_axes.set_yticks(range(len(paths)), paths, fontsize=6)
        layer_axes.invert_yaxis()
        layer_axes.set_xlabel(f"mean {self.measure.replace('_', ' ')}, alone")
        layer_axes.set_title("spread of each layer sampling alone")
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)
        return path


def diagnose_uncertainty(
    model,
    x,
    x_out_of_distribution=None,
    n=30,
    *,
    batch_size=None,
    seed=0,
    from_logits=None,
):
    """Measures whether a PVeRA model's Monte Carlo spread is informative.

    Runs `predict_with_uncertainty` on `x` with every adapted layer
    sampling, then once per adapted layer with only that layer sampling,
    and, if given, on `x_out_of_distribution`. The spread is the mutual
    information of each input (class outputs, the first output of a model
    with several) or the mean variance of its samples (other outputs).

    Args:
        model: A model adapted with `keras_pvera.apply`.
        x: In-distribution inputs, as for `predict_with_uncertainty`.
        x_out_of_distribution: Inputs the model should be unsure about, or
            `None`.
        n: Monte Carlo passes per run (a positive integer).
        batch_size: As for `predict_with_uncertainty`.
        seed: A non-negative integer seeding every run.
        from_logits: As for `UncertaintyResult.mutual_information`; `None`
            reads the model's outputs as it says.

    Returns:
        An `UncertaintyDiagnosis`.

    Raises:
        ValueError: As `predict_with_uncertainty` does.

    Example:

    >>> import keras, numpy as np, keras_pvera
    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                          keras.layers.Dense(3)])
    >>> model = keras_pvera.apply(base, rank=4)
    >>> diagnosis = keras_pvera.diagnose_uncertainty(model, np.ones((8, 4)), n=4)
    >>> diagnosis.verdict.startswith("Sampling barely changes")  # lambda_b is 0
    True
    """
    adapted = read_model(model).active_layers()

    def spread(inputs, sampled_layers=None):
        result = predict_with_uncertainty(
            model,
            inputs,
            n,
            batch_size=batch_size,
            seed=seed,
            return_samples=True,
            sampled_layers=sampled_layers,
            verbose=0,
        )
        return _spread_of(result, from_logits)

    measure, in_spread, in_entropy = spread(x)
    layer_spread = {path: float(np.mean(spread(x, [path])[1])) for path in adapted}
    out_spread = auroc = entropy_auroc = None
    if x_out_of_distribution is not None:
        _, out_spread, out_entropy = spread(x_out_of_distribution)
        auroc = metrics.auroc(in_spread, out_spread)
        if in_entropy is not None:
            entropy_auroc = metrics.auroc(in_entropy, out_entropy)
    return UncertaintyDiagnosis(
        measure=measure,
        in_distribution_spread=in_spread,
        out_of_distribution_spread=out_spread,
        layer_spread=layer_spread,
        auroc=auroc,
        entropy_auroc=entropy_auroc,
        verdict=_verdict(
            measure, in_spread, out_spread, layer_spread, auroc, entropy_auroc
        ),
    )


def _spread_of(result, from_logits):
    """`(measure, spread per input, predictive entropy per input or None)`
    of the model's first output."""
    samples = keras.tree.flatten(result.samples)[0]
    if from_logits is None:
        from_logits = keras.tree.flatten(result.from_logits)[0]
    first = UncertaintyResult(samples, from_logits=from_logits)
    if np.ndim(first.mean) >= 2 and np.shape(first.mean)[-1] >= 2:
        return (
            "mutual_information",
            _per_input(first.mutual_information()),
            _per_input(first.predictive_entropy()),
        )
    return "variance", _per_input(np.square(first.std)), None


def _per_input(values):
    """One figure per input: the mean over every axis but the first."""
    values = np.asarray(values, dtype="float64")
    return values.reshape(values.shape[0], -1).mean(axis=1)


def _verdict(measure, in_spread, out_spread, layer_spread, auroc, entropy_auroc):
    mean_spread = float(np.mean(in_spread))
    largest = (
        mean_spread
        if out_spread is None
        else max(mean_spread, float(np.mean(out_spread)))
    )
    name = measure.replace("_", " ")
    if largest < NEGLIGIBLE_SPREAD:
        return (
            f"Sampling barely changes the predictions (mean {name} "
            f"{largest:.2g}): the Monte Carlo spread carries no "
            "information here. Use the mean prediction (and its predictive "
            "entropy, or `keras_pvera.calibrate`) instead."
        )
    top = max(layer_spread, key=layer_spread.get)
    total = sum(layer_spread.values())
    share = layer_spread[top] / total if total > 0 else 0.0
    text = (
        f"Sampling produces a mean {name} of {mean_spread:.3g} on these "
        f"inputs; layer {top!r} alone produces {share:.0%} of the sum over "
        "layers."
    )
    if auroc is None:
        return text + (
            " Pass out-of-distribution inputs to learn whether the spread "
            "separates them."
        )
    entropy = "" if entropy_auroc is None else f", by entropy {entropy_auroc:.2f}"
    if auroc >= SEPARATES:
        judgement = f"The spread separates the two sets: AUROC {auroc:.2f}{entropy}."
    elif auroc >= WEAKLY_SEPARATES:
        judgement = (
            f"The spread separates the two sets weakly: AUROC {auroc:.2f}{entropy}."
        )
    elif auroc > INVERTED:
        judgement = (
            f"The spread does not separate the two sets: AUROC {auroc:.2f}"
            f"{entropy}; it is noise for this task."
        )
    else:
        judgement = (
            "The spread is inverted, in-distribution inputs vary more: "
            f"AUROC {auroc:.2f}{entropy}; do not read it as uncertainty."
        )
    if entropy_auroc is not None and entropy_auroc > auroc + 0.05:
        judgement += " Predictive entropy ranks them better here."
    return f"{text} {judgement}"
