"""`diagnose_uncertainty`: is a model's Monte Carlo spread informative?

The models here are built so that the answer is known whatever the seed
and backend: a layer whose `lambda_b` is zero adds nothing however it
samples, and a latent log-variance set through `lambda_d` makes the spread
tiny on one set of inputs and large on another.
"""

import keras
import numpy as np
import pytest

import keras_pvera

SEEDS = [0, 1, 2]
IN_DIM, RANK = 6, 2


def two_layer_model():
    base = keras.Sequential(
        [
            keras.Input((IN_DIM,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    return keras_pvera.apply(base, rank=RANK, seed=0, target=["hidden", "logits"])


def test_an_untrained_adapter_has_no_spread_and_says_so():
    model = two_layer_model()  # lambda_b starts at zero.
    x = np.random.default_rng(0).normal(size=(16, IN_DIM)).astype("float32")
    diagnosis = keras_pvera.diagnose_uncertainty(model, x, x + 5.0, n=8)
    assert diagnosis.measure == "mutual_information"  # Logits, three classes.
    assert diagnosis.verdict.startswith("Sampling barely changes the predictions")
    assert set(diagnosis.layer_spread) == {"hidden", "logits"}
    assert max(abs(v) for v in diagnosis.layer_spread.values()) < 1e-6  # rounding
    assert not model.sample_at_inference  # The runs leave the switch off.


@pytest.mark.parametrize("seed", SEEDS)
def test_each_layer_spread_is_its_own(seed):
    model = two_layer_model()
    hidden, logits = model.adapted_layers["hidden"], model.adapted_layers["logits"]
    rng = np.random.default_rng(seed)
    logits.lambda_b.assign(rng.normal(size=3).astype("float32") * 3)
    hidden.lambda_d.assign(np.full(2 * RANK, 2.0, "float32"))  # hidden: no lambda_b
    x = rng.normal(size=(12, IN_DIM)).astype("float32")
    diagnosis = keras_pvera.diagnose_uncertainty(model, x, n=6, seed=seed)
    # Zero up to float32 rounding of the entropies; a clear spread for logits.
    assert abs(diagnosis.layer_spread["hidden"]) < 1e-6
    assert diagnosis.layer_spread["logits"] > 1e-3
    assert diagnosis.layer_shares["logits"] > 0.999
    assert "'logits' alone produces 100%" in diagnosis.verdict
    assert "Pass out-of-distribution inputs" in diagnosis.verdict


def separable_model_and_sets(seed):
    """A one-layer model whose latent log-variance is `2 t` on inputs `t v`:
    tiny spread for t near -5, large for t near 1."""
    base = keras.Sequential(
        [keras.Input((IN_DIM,)), keras.layers.Dense(3, name="dense")]
    )
    model = keras_pvera.apply(base, rank=RANK, seed=seed, target=["dense"])
    layer = model.adapted_layers["dense"]
    a = keras.ops.convert_to_numpy(model.projection_registry.projection_a)
    # v with A_logvar v = 1: the log-variance is the same in every component.
    v = np.linalg.pinv(a[RANK:, :IN_DIM]) @ np.ones(RANK)
    layer.lambda_d.assign(np.array([0.0] * RANK + [2.0] * RANK, "float32"))
    layer.lambda_b.assign(np.full(3, 4.0, "float32"))
    rng = np.random.default_rng(seed)
    t_in, t_out = rng.uniform(-6, -4, 20), rng.uniform(0.5, 1.5, 20)
    as_inputs = lambda t: (t[:, None] * v[None, :]).astype("float32")  # noqa: E731
    return model, as_inputs(t_in), as_inputs(t_out)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_spread_that_separates_the_sets_is_reported(seed, tmp_path):
    model, x_in, x_out = separable_model_and_sets(seed)
    diagnosis = keras_pvera.diagnose_uncertainty(model, x_in, x_out, n=20, seed=seed)
    assert diagnosis.auroc == 1.0
    assert diagnosis.in_distribution_spread.shape == (20,)
    assert diagnosis.out_of_distribution_spread.min() > (
        100 * diagnosis.in_distribution_spread.max()
    )
    assert "separates the two sets: AUROC 1.00" in diagnosis.verdict
    pytest.importorskip("matplotlib")
    path = diagnosis.plot(tmp_path / "diagnosis.png")
    assert open(path, "rb").read(4)[1:] == b"PNG"


@pytest.mark.parametrize("seed", SEEDS)
def test_swapped_sets_read_as_inverted_and_equal_sets_as_chance(seed):
    model, x_in, x_out = separable_model_and_sets(seed)
    swapped = keras_pvera.diagnose_uncertainty(model, x_out, x_in, n=20, seed=seed)
    assert swapped.auroc == 0.0 and "inverted" in swapped.verdict
    same = keras_pvera.diagnose_uncertainty(model, x_out, x_out, n=20, seed=seed)
    assert same.auroc == 0.5  # Same inputs, same seed: every pair ties.
    assert "does not separate" in same.verdict


def test_sampling_in_chosen_layers_only():
    model = two_layer_model()
    model.adapted_layers["logits"].lambda_b.assign(np.ones(3, "float32"))
    x = np.ones((4, IN_DIM), "float32")
    # `hidden` has lambda_b == 0, so sampling it alone changes nothing.
    alone = keras_pvera.predict_with_uncertainty(
        model, x, n=5, seed=0, sampled_layers=["hidden"], verbose=0
    )
    np.testing.assert_allclose(alone.std, 0.0, atol=1e-6)  # float32 rounding
    both = keras_pvera.predict_with_uncertainty(model, x, n=5, seed=0, verbose=0)
    assert np.all(both.std > 0)
    with pytest.raises(ValueError, match=r"\['head'\] are not among them"):
        keras_pvera.predict_with_uncertainty(
            model, x, n=2, sampled_layers=["head"], verbose=0
        )
    with pytest.raises(ValueError, match="must be a list of adapted layer paths"):
        keras_pvera.predict_with_uncertainty(
            model, x, n=2, sampled_layers="hidden", verbose=0
        )
