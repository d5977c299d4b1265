"""What a call's array inputs hold: the one place that counts their
examples (`adapter_names` needs one name per example)."""

import keras


def num_examples(x):
    """The number of examples in array inputs (the first axis of each leaf).

    Example:

    >>> import numpy as np
    >>> num_examples({"a": np.zeros((3, 2)), "b": np.zeros((3,))})
    3

    Raises:
        ValueError: For inputs that are not arrays (a dataset or generator:
            their batches cannot carry one adapter name per example), or
            leaves that disagree on the number of examples.
    """
    leaves = keras.tree.flatten(x)
    if not leaves or not all(len(getattr(leaf, "shape", ())) > 0 for leaf in leaves):
        raise ValueError(
            "`adapter_names` needs inputs as arrays (or a list, tuple or dict "
            "of arrays; raw strings or images for a KerasHub task), with one "
            f"name per example. Received: x of type {type(x).__name__}"
        )
    sizes = {int(leaf.shape[0]) for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(
            "All inputs must have the same number of examples (first "
            f"dimension). Received sizes: {sorted(sizes)}"
        )
    return sizes.pop()
