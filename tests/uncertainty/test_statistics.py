"""`UncertaintyResult`: the statistics of Monte Carlo samples, against NumPy.

The samples here are made up (no model): `predict_with_uncertainty`'s own
tests (test_monte_carlo.py) check what the run hands to these statistics.
"""

import numpy as np
import pytest
import scipy.special
import scipy.stats

from keras_pvera import UncertaintyResult


def softmax(logits):
    return scipy.special.softmax(logits, axis=-1)


def entropy(p):
    return scipy.stats.entropy(p, axis=-1)


def test_entropies_of_probabilities_equal_numpy_formulas():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(6, 5))  # n=6 samples, 5 examples
    result = UncertaintyResult(p)
    predictive = entropy(p.mean(axis=0))
    expected = entropy(p).mean(axis=0)
    np.testing.assert_allclose(result.predictive_entropy(), predictive)
    np.testing.assert_allclose(result.expected_entropy(), expected)
    np.testing.assert_allclose(result.mutual_information(), predictive - expected)
    # 0 log 0 = 0: a certain sample has zero entropy.
    certain = UncertaintyResult(np.array([[[1.0, 0.0, 0.0]]] * 3))
    np.testing.assert_array_equal(certain.predictive_entropy(), [0.0])
    np.testing.assert_array_equal(certain.mutual_information(), [0.0])


def test_entropies_of_logits_equal_numpy_formulas():
    rng = np.random.default_rng(1)
    logits = 3.0 * rng.normal(size=(8, 5, 4))
    result = UncertaintyResult(logits)
    p = softmax(logits)
    predictive = entropy(p.mean(axis=0))
    expected = entropy(p).mean(axis=0)
    np.testing.assert_allclose(result.predictive_entropy(from_logits=True), predictive)
    np.testing.assert_allclose(result.expected_entropy(from_logits=True), expected)
    np.testing.assert_allclose(
        result.mutual_information(from_logits=True), predictive - expected
    )
    np.testing.assert_array_equal(
        result.predicted_class, np.argmax(logits.mean(axis=0), axis=-1)
    )


def test_single_unit_outputs_are_binary():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, 5, 1))
    p = 1.0 / (1.0 + np.exp(-logits))
    two_classes = np.concatenate([1 - p, p], axis=-1)
    predictive = entropy(two_classes.mean(axis=0))
    expected = entropy(two_classes).mean(axis=0)
    from_probabilities = UncertaintyResult(p)
    from_logits = UncertaintyResult(logits)
    np.testing.assert_allclose(from_probabilities.predictive_entropy(), predictive)
    np.testing.assert_allclose(from_probabilities.expected_entropy(), expected)
    np.testing.assert_allclose(
        from_logits.predictive_entropy(from_logits=True), predictive
    )
    np.testing.assert_allclose(
        from_logits.mutual_information(from_logits=True),
        predictive - expected,
        atol=1e-12,
    )
    np.testing.assert_array_equal(
        from_probabilities.predicted_class, (p.mean(axis=0)[:, 0] > 0.5)
    )


def test_outputs_without_a_class_axis_have_no_class_statistics():
    result = UncertaintyResult(np.ones((4, 3)))  # n=4, 3 scalar predictions
    np.testing.assert_array_equal(result.std, np.zeros(3))
    with pytest.raises(ValueError, match="classes"):
        result.mutual_information()


def test_a_result_from_raw_samples_checks_that_they_are_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 3))
    result = UncertaintyResult(logits)  # Nothing says these are logits.
    assert result.from_logits is None
    with pytest.raises(
        ValueError, match=r"since nothing says.*outside \[0, 1\].*from_logits=True"
    ):
        result.predictive_entropy()
    told = UncertaintyResult(logits, from_logits=True)
    np.testing.assert_allclose(
        told.mutual_information(), result.mutual_information(from_logits=True)
    )
    # Probabilities need no from_logits.
    p = softmax(logits)
    np.testing.assert_allclose(
        UncertaintyResult(p).predictive_entropy(), entropy(p.mean(axis=0))
    )
    # Softmax rounding in float16 is within the tolerance.
    half = UncertaintyResult(p.astype("float16"))
    assert np.all(np.isfinite(half.mutual_information()))


@pytest.mark.parametrize(
    "values, found",
    [
        (np.full((2, 3, 2), [1.5, -0.5]), r"values from -0\.5 to 1\.5, outside"),
        (np.full((2, 3, 3), 0.5), r"rows of 3 classes summing to 1\.5 to 1\.5"),
        (np.full((2, 3, 1), 2.0), r"values from 2 to 2, outside \[0, 1\]"),
        (np.full((2, 3, 2), np.nan), "NaN or infinite values"),
    ],
)
def test_values_read_as_probabilities_that_cannot_be_raise(values, found):
    result = UncertaintyResult(values, from_logits=False)
    for statistic in (
        result.predictive_entropy,
        result.expected_entropy,
        result.mutual_information,
        result.mean_probabilities,
    ):
        with pytest.raises(ValueError, match=f"from_logits=False.*{found}"):
            statistic()
    with pytest.raises(ValueError, match=found):
        UncertaintyResult(values).mutual_information(from_logits=False)


def test_single_unit_logits_are_class_1_above_0():
    logits = np.array([[[0.3], [-0.2]], [[0.1], [-0.4]]])  # n=2, 2 examples
    np.testing.assert_array_equal(
        UncertaintyResult(logits, from_logits=True).predicted_class, [1, 0]
    )
    np.testing.assert_allclose(
        UncertaintyResult(logits, from_logits=True).mean_probabilities(),
        np.mean(1 / (1 + np.exp(-logits)), axis=0),
    )
    with pytest.raises(ValueError, match=r"predicted_class.*outside \[0, 1\]"):
        UncertaintyResult(logits).predicted_class  # noqa: B018


def test_bad_from_logits_raises_naming_it():
    with pytest.raises(ValueError, match="from_logits='yes'"):
        UncertaintyResult(np.ones((2, 3, 2)) / 2, from_logits="yes")
    result = UncertaintyResult({"a": np.ones((2, 3, 2)) / 2})
    with pytest.raises(ValueError, match=r"\{'a': '...'\}.*from_logits=\[True\]"):
        result.predictive_entropy(from_logits=[True])
