"""Checks of user-given numbers and flags: the one place that says what
they may be.

Python's `bool` is an `int`, and NumPy's scalars are not Python's: these
checks accept integers of any kind but never a bool, real numbers that are
finite, and flags that are Python's or NumPy's booleans.
"""

import math
import numbers

import numpy as np


def is_integer(value, minimum=None):
    """Whether `value` is an integer, not a bool, and at least `minimum`.

    Example:

    >>> is_integer(3), is_integer(True), is_integer(np.int64(0), minimum=1)
    (True, False, False)
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        return False
    return minimum is None or bool(value >= minimum)


def is_finite_number(value):
    """Whether `value` is a finite real number, not a bool."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )


def is_boolean(value):
    """Whether `value` is True or False (Python's or NumPy's)."""
    return isinstance(value, (bool, np.bool_))


def checked_integer(value, name, minimum=1, expected="a positive integer"):
    """`value` as an `int`, or a `ValueError` naming it and what is expected.

    Args:
        value: The value given.
        name: The argument's name, for the message.
        minimum: The smallest value allowed.
        expected: What the message says the argument must be.

    Example:

    >>> checked_integer(np.int32(4), "n")
    4
    >>> checked_integer(0, "n")
    Traceback (most recent call last):
        ...
    ValueError: `n` must be a positive integer. Received: n=0
    """
    if not is_integer(value, minimum):
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}")
    return int(value)


def checked_number(value, name, allowed, expected):
    """`value` as a `float`, or a `ValueError` naming it and what is expected.

    Args:
        value: The value given.
        name: The argument's name, for the message.
        allowed: Whether a finite number is in range: `(value) -> bool`.
        expected: What the message says the argument must be.

    Example:

    >>> checked_number(np.float32(0.5), "p", lambda v: 0 <= v <= 1, "in [0, 1]")
    0.5
    """
    if not is_finite_number(value) or not allowed(value):
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}")
    return float(value)


def checked_boolean(value, name):
    """`value` as a `bool`, or a `ValueError` naming it.

    Example:

    >>> checked_boolean(np.True_, "flag")
    True
    """
    if not is_boolean(value):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)
