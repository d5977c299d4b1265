"""Quantiles of Student's t-distribution, in pure Python.

`UncertaintyResult.mean_interval` needs the t quantile for a confidence
interval of a Monte Carlo mean. SciPy has it, but SciPy is not a dependency
of keras_pvera, so this module computes it from the regularized incomplete
beta function:

    P(T > t) = 0.5 * I_x(df / 2, 1 / 2),    x = df / (df + t**2),   t >= 0

`I_x` is evaluated with its continued fraction (modified Lentz method), and
the quantile is found by bisection on `t`. The result agrees with
`scipy.stats.t.ppf` to about 1e-12 relative.
"""

import math

_MAX_TERMS = 500
_TINY = 1e-300
_EPSILON = 1e-15


def _beta_continued_fraction(x, a, b):
    """The continued fraction of `I_x(a, b)`; converges for x < (a+1)/(a+b+2)."""
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    fraction = d
    for m in range(1, _MAX_TERMS + 1):
        two_m = 2 * m
        # Even step: d_2m = m (b - m) x / ((a + 2m - 1)(a + 2m)).
        term = m * (b - m) * x / ((a + two_m - 1.0) * (a + two_m))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + term / c
        c = c if abs(c) > _TINY else _TINY
        fraction *= d * c
        # Odd step: d_2m+1 = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)).
        term = -(a + m) * (a + b + m) * x / ((a + two_m) * (a + two_m + 1.0))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + term / c
        c = c if abs(c) > _TINY else _TINY
        step = d * c
        fraction *= step
        if abs(step - 1.0) < _EPSILON:
            break
    return fraction


def _beta_front(x, a, b):
    """`x**a (1 - x)**b / (a B(a, b))`, from `x` and `1 - x` given apart."""
    return (
        math.exp(
            math.lgamma(a + b)
            - math.lgamma(a)
            - math.lgamma(b)
            + a * math.log(x)
            + b * math.log(1.0 - x)
        )
        / a
    )


def regularized_incomplete_beta(x, a, b):
    """The regularized incomplete beta function `I_x(a, b)`.

    Args:
        x: A number in `[0, 1]`.
        a: A positive number.
        b: A positive number.

    Returns:
        A float in `[0, 1]`.

    Example:

    >>> round(regularized_incomplete_beta(0.5, 2.0, 2.0), 12)
    0.5
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x < (a + 1.0) / (a + b + 2.0):
        return _beta_front(x, a, b) * _beta_continued_fraction(x, a, b)
    # Symmetry I_x(a, b) = 1 - I_{1-x}(b, a), where the fraction converges.
    y = 1.0 - x
    return 1.0 - _beta_front(y, b, a) * _beta_continued_fraction(y, b, a)


def _central_and_tail(t, df):
    """`(P(0 < T < t), P(T > t))` for `t > 0`, each to full relative precision.

    With `x = df / (df + t**2)` and `y = t**2 / (df + t**2)` (computed apart,
    so that neither loses digits as `1 - other`), the tail is
    `0.5 * I_x(df/2, 1/2)` and the central part `0.5 * I_y(1/2, df/2)`. The
    one whose continued fraction converges is computed directly; the other
    is `0.5` minus it.
    """
    a, b = 0.5 * df, 0.5
    x = df / (df + t * t)
    y = t * t / (df + t * t)
    if x <= 0.0:
        return 0.5, 0.0
    if y <= 0.0:
        return 0.0, 0.5
    if x < (a + 1.0) / (a + b + 2.0):
        tail = 0.5 * _beta_front(x, a, b) * _beta_continued_fraction(x, a, b)
        return 0.5 - tail, tail
    central = 0.5 * _beta_front(y, b, a) * _beta_continued_fraction(y, b, a)
    return central, 0.5 - central


def student_t_upper_tail(t, df):
    """`P(T > t)` for Student's t-distribution with `df` degrees of freedom.

    Args:
        t: A number.
        df: Degrees of freedom, a positive number.

    Returns:
        A float in `[0, 1]`.

    Example:

    >>> student_t_upper_tail(0.0, 5)
    0.5
    """
    if t == 0.0:
        return 0.5
    _, tail = _central_and_tail(abs(t), df)
    return tail if t > 0 else 1.0 - tail


def student_t_quantile(probability, df):
    """The `probability` quantile of Student's t-distribution.

    Equal to `scipy.stats.t.ppf(probability, df)`.

    Args:
        probability: A number strictly between 0 and 1.
        df: Degrees of freedom, a positive number.

    Returns:
        A float `t` with `P(T <= t) = probability`.

    Raises:
        ValueError: If `probability` is not in `(0, 1)` or `df` is not
            positive.

    Example:

    >>> round(student_t_quantile(0.975, 10), 6)
    2.228139
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(
            "`probability` must be strictly between 0 and 1. "
            f"Received: probability={probability!r}"
        )
    if not df > 0:
        raise ValueError(f"`df` must be a positive number. Received: df={df!r}")
    if probability == 0.5:
        return 0.0
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
    # Both targets are exact in floating point for probability in (0.5, 1).
    central_target = probability - 0.5
    tail_target = 1.0 - probability

    def below(t):
        # Whether the quantile lies above t; compares the smaller, exact part.
        central, tail = _central_and_tail(t, df)
        if central_target < tail_target:
            return central < central_target
        return tail > tail_target

    low, high = 0.0, 1.0
    while below(high):
        low, high = high, 2.0 * high
    # Bisect until the bracket stops shrinking.
    while True:
        middle = 0.5 * (low + high)
        if middle <= low or middle >= high:
            return middle
        if below(middle):
            low = middle
        else:
            high = middle
