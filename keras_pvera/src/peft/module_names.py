"""Finding a model's PEFT module-name table, and reading its kernels' layouts.

The tables themselves are data in `peft/architectures/` (one module per
family), their schema in `peft/architecture_spec.py`, which also says what
each layout means.
"""

import importlib.metadata
import math
import re

import numpy as np

from keras_pvera.src.layers.linear_map import LinearEquation
from keras_pvera.src.peft.architecture_spec import LAYOUTS
from keras_pvera.src.peft.architectures import SPECS
from keras_pvera.src.surgery import layer_walk


def find_spec(model):
    """Finds the supported KerasHub backbone in a model and its spec.

    Args:
        model: A KerasHub backbone, or a model that holds one (a task model).

    Returns:
        A tuple `(spec, path_prefix)`: the backbone's `ArchitectureSpec`,
        and the backbone's layer path followed by `/` (`""` for the backbone
        itself), to put in front of the spec's KerasHub paths.

    Raises:
        ValueError: If the model holds no backbone with a spec.

    Example:

    >>> import keras_hub
    >>> bert = keras_hub.models.BertBackbone(
    ...     vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=8)
    >>> spec, prefix = find_spec(bert)
    >>> spec.backbone, prefix
    ('BertBackbone', '')
    """
    candidates = [("", model)] + list(layer_walk.iter_layers(model))
    for path, layer in candidates:
        for cls in type(layer).__mro__:
            if cls.__name__ in SPECS and cls.__module__.startswith("keras_hub"):
                return SPECS[cls.__name__], f"{path}/" if path else ""
    raise ValueError(
        f"PEFT interoperability has no module-name table for model "
        f"{model.name!r} of type {type(model).__name__}. Supported KerasHub "
        f"backbones: {sorted(SPECS)}."
    )


def task_head(model, spec):
    """The `TaskHead` of a KerasHub task model, or `None`.

    Args:
        model: A KerasHub model (a task, or a backbone: `None`).
        spec: The `ArchitectureSpec` of its backbone.

    Returns:
        The spec's `TaskHead` for the model's task class or one it inherits
        from, or `None`.
    """
    for cls in type(model).__mro__:
        if cls.__module__.startswith("keras_hub"):
            head = spec.head(cls.__name__)
            if head is not None:
                return head
    return None


def kernel_matrix(kernel, layout, equation=None):
    """A KerasHub kernel as the `(in, out)` matrix of its linear map.

    Args:
        kernel: The kernel as a NumPy array.
        layout: One of `LAYOUTS` (documentation: every layout reads the same
            way).
        equation: The `EinsumDense` equation, or `None` for a `Dense`.

    Returns:
        A 2D NumPy array: the kernel's contracted axes flattened to rows and
        its output axes to columns, each row-major in kernel order.

    Raises:
        ValueError: For an unknown layout.

    Example:

    >>> import numpy as np
    >>> kernel = np.arange(24.0).reshape(2, 3, 4)  # (heads, hidden, head_dim)
    >>> kernel_matrix(kernel, "heads", "btd,ndh->btnh").shape
    (3, 8)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}. Received: {layout!r}")
    if equation is None:
        return np.asarray(kernel)
    linear = LinearEquation(equation, kernel.shape)
    # to_kernel_order maps (in dims..., out dims...) axes to kernel axes.
    order = [linear.to_kernel_order.index(axis) for axis in range(kernel.ndim)]
    matrix = np.transpose(kernel, order)
    return matrix.reshape(math.prod(linear.in_dims), math.prod(linear.out_dims))


def default_naming():
    """The module naming of the installed transformers (read, not imported).

    Returns:
        `"legacy"` if a transformers older than 5 is installed, else
        `"transformers5"`.
    """
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "transformers5"
    major = re.match(r"\d+", version)
    return "legacy" if major and int(major.group()) < 5 else "transformers5"
