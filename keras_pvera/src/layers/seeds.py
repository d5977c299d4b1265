"""Seeds derived from seeds: the one way keras_pvera makes independent ones.

A layer's noise seed comes from the adapter's seed and the layer's index;
a Monte Carlo run's noise states from its seed. Consecutive integers would
give overlapping random streams on some backends (torch seeds each draw
from the sum of the generator's state), so every derived seed goes
through NumPy's `SeedSequence`, and keeps 31 bits, which every backend's
seed dtype holds (int32 on torch).
"""

import numpy as np

from keras_pvera.src.utils import checks


def derived_seeds(entropy, count):
    """`count` independent 31-bit seeds derived from `entropy`.

    Args:
        entropy: An integer or a sequence of integers.
        count: How many seeds.

    Returns:
        A list of Python ints.

    Example:

    >>> derived_seeds([0, 1], 1) != derived_seeds([0, 2], 1)
    True
    """
    words = np.random.SeedSequence(entropy).generate_state(count, dtype=np.uint32)
    return [int(word >> 1) for word in words]


def derive_seed(seed, index):
    """The seed of item `index` (a layer, a dropout) under `seed`."""
    return derived_seeds([seed, index], 1)[0]


def seed_generator_states(entropy, count, dtype):
    """`count` independent `keras.random.SeedGenerator` states.

    Args:
        entropy: An integer or a sequence of integers.
        count: How many states.
        dtype: The states' dtype (the backend's seed dtype).

    Returns:
        A list of `(2,)` arrays.
    """
    return [np.array([seed, 0], dtype=dtype) for seed in derived_seeds(entropy, count)]


def noise_seed_of(config, noise_seed=None):
    """An adapted layer's noise seed: `noise_seed`, checked, or (`None`)
    `config.generator_seed`, or `config.seed` when that is `None`.

    Raises:
        ValueError: If `noise_seed` is not a non-negative integer.
    """
    if noise_seed is None:
        noise_seed = config.seed
        if config.generator_seed is not None:
            noise_seed = config.generator_seed
    if not checks.is_integer(noise_seed) or noise_seed < 0:
        raise ValueError(
            "`noise_seed` must be a non-negative integer or None. "
            f"Received: noise_seed={noise_seed!r}"
        )
    return int(noise_seed)
