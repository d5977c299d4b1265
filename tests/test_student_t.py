"""Student's t quantiles without SciPy, checked against SciPy and closed forms."""

import math

import pytest
import scipy.stats

from keras_pvera.student_t import regularized_incomplete_beta
from keras_pvera.student_t import student_t_quantile


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 29, 100, 1000])
@pytest.mark.parametrize("probability", [0.6, 0.9, 0.95, 0.975, 0.995, 0.9995])
def test_quantile_equals_scipy(df, probability):
    expected = scipy.stats.t.ppf(probability, df)
    assert student_t_quantile(probability, df) == pytest.approx(expected, rel=1e-9)
    assert student_t_quantile(1 - probability, df) == pytest.approx(-expected, rel=1e-9)


@pytest.mark.parametrize("probability", [0.5000001, 0.7, 0.975, 1 - 1e-9])
def test_quantile_equals_closed_forms(probability):
    # df = 1 is Cauchy; df = 2 has t = (2p - 1) / sqrt(2 p (1 - p)).
    cauchy = 1.0 / math.tan(math.pi * (1.0 - probability))
    assert student_t_quantile(probability, 1) == pytest.approx(cauchy, rel=1e-12)
    two = (2 * probability - 1) / math.sqrt(2 * probability * (1 - probability))
    assert student_t_quantile(probability, 2) == pytest.approx(two, rel=1e-12)


def test_incomplete_beta_equals_scipy():
    for x, a, b in [(0.3, 0.5, 0.5), (0.9, 2.5, 0.5), (0.1, 50, 0.5), (0.99, 3, 7)]:
        expected = scipy.special.betainc(a, b, x)
        assert regularized_incomplete_beta(x, a, b) == pytest.approx(
            expected, rel=1e-12
        )


@pytest.mark.parametrize("probability", [0, 1, 1.5, -0.1])
def test_bad_probability(probability):
    with pytest.raises(ValueError, match=f"probability={probability}"):
        student_t_quantile(probability, 3)


def test_bad_df():
    with pytest.raises(ValueError, match="df=0"):
        student_t_quantile(0.9, 0)
