"""A KerasHub task adapted with PVeRA keeps its workflow.

A KerasHub `Task` (`TextClassifier`, `CausalLM`, `ImageClassifier`...)
runs raw inputs (strings, images) through its `preprocessor` inside
`fit`, `evaluate` and `predict`. `PVeRAModel` calls the adapted task's
network directly, so it maps the task's `preprocess_samples` over the
inputs first, as the task's own methods do; everything else of the task
(`generate`, `backbone`, `preprocessor`, ...) is reached through the
`PVeRAModel`.
"""

import contextlib
import functools

import keras
import numpy as np
from keras import ops

from keras_pvera.src.layers import row_adapters
from keras_pvera.src.layers.seeds import seed_generator_states
from keras_pvera.src.utils import array_inputs
from keras_pvera.src.utils import keras_hub_tasks
from keras_pvera.src.utils import keras_internals


def fit_arguments(model, args, kwargs):
    """`fit`'s arguments with raw inputs preprocessed (see `preprocessed`)."""
    return _arguments(model, ("x", "y", "batch_size"), args, kwargs, fit=True)


def evaluate_arguments(model, args, kwargs):
    """`evaluate`'s arguments with raw inputs preprocessed."""
    return _arguments(model, ("x", "y", "batch_size"), args, kwargs)


def predict_arguments(model, args, kwargs):
    """`predict`'s arguments with raw inputs preprocessed."""
    return _arguments(model, ("x", "batch_size"), args, kwargs)


def _arguments(model, names, args, kwargs, fit=False):
    # `fit` evaluates its (already preprocessed) validation data this way.
    if keras_internals.evaluates_cached_validation(kwargs):
        return args, kwargs
    if keras_hub_tasks.task_with_preprocessor(model) is None:
        return args, kwargs
    kwargs = dict(kwargs)
    kwargs.update(zip(names, args, strict=False))
    args = args[len(names) :]
    if fit and kwargs.get("validation_split"):
        raise ValueError(
            "`validation_split` is not supported on raw task inputs; pass "
            "`validation_data=(x, y)` instead. Received: "
            f"validation_split={kwargs['validation_split']!r}"
        )
    x = kwargs.pop("x", None)
    y = kwargs.pop("y", None)
    sample_weight = kwargs.pop("sample_weight", None)
    batch_size = kwargs.pop("batch_size", None)
    # Keras' `shuffle` does not reach a dataset: shuffle arrays here.
    shuffle = fit and kwargs.pop("shuffle", True)
    if fit:
        kwargs["shuffle"] = False
    kwargs["x"] = keras_hub_tasks.preprocessed(
        model, x, y, sample_weight, batch_size, shuffle
    )
    if fit and kwargs.get("validation_data") is not None:
        validation = kwargs["validation_data"]
        if isinstance(validation, (tuple, list)):
            vx, vy, vsw = keras.utils.unpack_x_y_sample_weight(tuple(validation))
            kwargs["validation_data"] = keras_hub_tasks.preprocessed(
                model, vx, vy, vsw, batch_size
            )
        else:
            kwargs["validation_data"] = keras_hub_tasks.preprocessed(model, validation)
    return args, kwargs


def task_attribute(model, name):
    """A public attribute of the adapted task (`generate`, `preprocessor`...).

    Raises:
        AttributeError: If `name` is private or the task has no such
            attribute (or the model adapts no task).
    """
    task = keras_hub_tasks.task_of(model) if not name.startswith("_") else None
    if task is None or not hasattr(task, name):
        raise AttributeError(
            f"{type(model).__name__!r} object has no attribute {name!r}"
        )
    if name == "generate":
        return functools.partial(generate, model, task)
    if name == "export_to_transformers":
        return export_to_transformers
    return getattr(task, name)


def export_to_transformers(path):
    """Refuses: KerasHub's exporters read the base layers' own kernels.

    Raises:
        ValueError: Always, naming the call that exports the adapted model.
    """
    raise ValueError(
        "An adapted task exports once merged: "
        f"`keras_pvera.merge(model).export_to_transformers({path!r})`. "
        "KerasHub's exporters read each layer's kernel, and the adapted "
        "layers hold the adapter beside the kernel, not in it."
    )


def generate(model, task, inputs, *args, adapter_names=None, **kwargs):
    """The task's `generate`, drawing fresh adapter noise on every call.

    With `sample_at_inference` on, every adapted layer samples its latent
    code at each step of the task's cached loop. Torch and TensorFlow keep
    the advanced noise streams after a call; KerasHub's compiled JAX loop
    hands back only its sampler's state, so each call would replay the same
    draws: on JAX each stream first moves to a fresh state derived from its
    current one (reproducible after `keras.utils.set_random_seed` or a
    seeded adapter).

    With `adapter_names`, each prompt is continued by its own adapter in
    one batch (the task's loop is compiled for that batch, and dropped
    after the call). Inputs must then be one batch (a list or array of
    prompts, or a dict of arrays), not a dataset, and the sampler must
    keep one row per prompt (not a beam search).

    Args:
        model: A `PVeRAModel` adapting a KerasHub generative task.
        task: That task.
        inputs: As for the task's `generate`.
        *args, **kwargs: As for the task's `generate`.
        adapter_names: `None` (the active adapters run), or one loaded
            adapter name per prompt (`"__base__"`: the base model).

    Returns:
        What the task's `generate` returns.
    """
    if keras.config.backend() == "jax":
        layers = model.adapted_layers
        if adapter_names is not None:
            layers = model.adapter_registry.layers_of(
                [n for n in set(adapter_names) if n in model.adapter_names]
            )
        for layer in layers.values():
            if any(layer.sampling_flags().values()):
                _jump(layer.seed_generator)
    # Layers reading one input (attention's query and value) share x @ A.
    with contextlib.ExitStack() as stack:
        stack.enter_context(model.projection_registry.sharing_products())
        if adapter_names is not None:
            if isinstance(inputs, (list, tuple)):
                count = array_inputs.num_examples(np.asarray(inputs))
            else:
                count = array_inputs.num_examples(inputs)
            _, indices = stack.enter_context(
                model.adapters_by_row(adapter_names, count)
            )
            stack.enter_context(
                row_adapters.selecting(
                    model.row_adapter_names, indices, model.row_adapter_tables
                )
            )
            # The task's compiled loop bakes these indices in: it is traced
            # for this call and dropped after it.
            keras_internals.drop_compiled_functions(model)
            stack.callback(keras_internals.drop_compiled_functions, model)
        return task.generate(inputs, *args, **kwargs)


def _jump(seed_generator):
    state = np.asarray(ops.convert_to_numpy(seed_generator.state.value))
    words = [int(word) for word in state.ravel()]
    seed_generator.state.assign(seed_generator_states(words, 1, state.dtype)[0])
