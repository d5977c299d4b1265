"""PVeRA's KL term (how far a layer's latent code is from its prior) and
the optional bound on the latent log-variance that the noise and the KL
term both read."""

from keras import ops


def kl_divergence(mu, logvar):
    """PVeRA's KL term of one layer: the mean over all positions and units.

    `mean(-0.5 * (1 + logvar - mu**2 - exp(logvar)))`, the KL divergence of
    `N(mu, exp(logvar))` from `N(0, 1)` per latent unit, averaged.

    Args:
        mu: Latent means, any shape.
        logvar: Latent log-variances, same shape as `mu`.

    Returns:
        A scalar tensor.

    `mu` and `logvar` must broadcast together; the backend raises its own
    error if they do not.

    Example:

    >>> import numpy as np
    >>> float(kl_divergence(np.zeros((2, 3)), np.zeros((2, 3))))
    0.0
    """
    mu = ops.convert_to_tensor(mu)
    logvar = ops.convert_to_tensor(logvar)
    return ops.mean(-0.5 * (1.0 + logvar - ops.square(mu) - ops.exp(logvar)))


def bound_log_variance(logvar, max_log_variance):
    """`logvar` clipped from above at `max_log_variance` (`None`: unchanged).

    A hard clip, so values below the bound are exactly the unbounded ones
    (a smooth bound such as `max * tanh(logvar / max)` would change every
    value); above it the gradient is zero.

    Example:

    >>> import numpy as np
    >>> np.asarray(bound_log_variance(np.array([1.0, 50.0]), 10.0)).tolist()
    [1.0, 10.0]
    """
    if max_log_variance is None:
        return logvar
    logvar = ops.convert_to_tensor(logvar)
    return ops.minimum(logvar, ops.cast(max_log_variance, logvar.dtype))
