"""Writing a PVeRA adapter's mean as KerasHub's own LoRA file (`.lora.h5`).

KerasHub's `Backbone.enable_lora(rank)` turns on Keras' LoRA in every layer
of the backbone named in `backbone.default_lora_layer_names()` (`query` and
`value` in most models). Keras' LoRA adds `lora_kernel_a @ lora_kernel_b *
(lora_alpha / rank)` to the kernel, with `lora_kernel_a` of shape
`kernel.shape[:-1] + (rank,)`, `lora_kernel_b` of shape `(rank,
kernel.shape[-1])`, and `lora_alpha = rank` (scaling 1) as KerasHub enables
it. `Backbone.save_lora_weights` writes, in an HDF5 file, the rank and each
such layer's two factors under its index among the backbone's layers with
weights (`lora/<index>/vars/lora_kernel_a`, ...); layer names are not
recorded. `load_lora_weights` reads them back into a fresh backbone.

Each layer's mean delta is written exactly:
- a kernel whose last axis is the whole output, after the contracted axes
  (`Dense`, an attention output `(heads, head_dim, hidden)`), takes the
  rank-`r` factors of `PVeRADense.mean_factors`;
- a kernel whose output spans several axes (a query `(hidden, heads,
  head_dim)`) cannot be split so at rank `r` (Keras' factor `b` is shared by
  every head): its `lora_kernel_a` is the delta kernel itself
  (`delta_kernel`) and `lora_kernel_b` the identity, at rank
  `kernel.shape[-1]` (the head size).
The file has one rank: the largest a layer needs, the other layers' factors
padded with zeros; a LoRA layer that the adapter does not adapt gets zeros.
"""

import os

import keras
import numpy as np

from keras_pvera.src.layers.linear_map import LinearEquation
from keras_pvera.src.layers.wrapped_layer import AsWrappedLayer
from keras_pvera.src.saving import safetensors_io
from keras_pvera.src.saving.adapter_state import adapter_state_of
from keras_pvera.src.saving.adapter_state import check_uncalibrated
from keras_pvera.src.surgery.layer_selection import keras_hub_backbones
from keras_pvera.src.utils import keras_internals

SUFFIX = ".lora.h5"


def save_lora_weights(model, path, *, adapter=None):
    """Writes an adapter's mean as KerasHub's LoRA file (`.lora.h5`).

    A fresh KerasHub model of the same architecture and weights then loads
    it with its own `backbone.load_lora_weights(path)` (no `enable_lora`
    call needed) and gives the adapted model's mean predictions. The file
    holds what `backbone.save_lora_weights` would: a rank and, per layer
    that KerasHub's `enable_lora` adapts, `lora_kernel_a` and
    `lora_kernel_b`. Each delta is exact (see below for the rank). The
    write is atomic.

    Only the mean is written: an adapter with `sample_at_inference=True` is
    written too, as the predictions' mean, since LoRA has no sampling. To
    write several adapters, call it once per adapter name, one file each.

    The rank in the file is PVeRA's `r` when every adapted kernel has its
    whole output on its last axis. Attention projections whose kernels
    split the output per head (KerasHub's query and value) cannot be
    written at rank `r`, because Keras' LoRA shares its second factor
    across heads: their first factor holds the delta kernel itself, at the
    rank of the head size (`kernel.shape[-1]`); the file then has the
    larger of the two ranks.

    Args:
        model: A `PVeRAModel` over a KerasHub backbone or task, whose adapted
            layers are all among those KerasHub's `backbone.enable_lora()`
            adapts (its `default_lora_layer_names()`, usually `query` and
            `value`: `keras_pvera.apply`'s default targets).
        path: The file to write; its name must end in `.lora.h5`, as
            KerasHub requires.
        adapter: The adapter's name; `None` for the active one.

    Returns:
        None.

    Raises:
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: For a name without `.lora.h5`; a model without exactly
            one KerasHub backbone at its root; an adapted layer KerasHub's
            LoRA does not adapt (its file records layer indices, not names,
            so it cannot hold others); layers trained in full beside the
            adapter; a calibrated model.

    Example:

    >>> import os, tempfile
    >>> import keras, keras_hub, keras_pvera, numpy as np
    >>> def bert():
    ...     keras.utils.set_random_seed(0)
    ...     return keras_hub.models.BertBackbone(
    ...         vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...         intermediate_dim=16, max_sequence_length=8)
    >>> model = keras_pvera.apply(bert(), rank=4)  # query and value
    >>> for layer in model.adapted_layers.values():  # as if trained
    ...     _ = layer.lambda_b.assign(np.ones(layer.out_dim))
    >>> path = os.path.join(tempfile.mkdtemp(), "adapter.lora.h5")
    >>> keras_pvera.save_lora_weights(model, path)

    KerasHub loads it into a fresh backbone, which then predicts as the
    adapted model does:

    >>> fresh = bert()
    >>> fresh.load_lora_weights(path)
    >>> x = {"token_ids": np.ones((1, 8), "int32"),
    ...      "segment_ids": np.zeros((1, 8), "int32"),
    ...      "padding_mask": np.ones((1, 8), bool)}
    >>> expected = model.predict(x, verbose=0)["sequence_output"]
    >>> actual = fresh.predict(x, verbose=0)["sequence_output"]
    >>> bool(np.abs(actual - expected).max() < 1e-5)
    True
    """
    if not str(path).endswith(SUFFIX):
        raise ValueError(
            f"A KerasHub LoRA file's name must end in {SUFFIX!r}, as "
            f"KerasHub's save_lora_weights requires. Received: path={path!r}"
        )
    state = adapter_state_of(model, adapter)
    check_uncalibrated(model, "KerasHub's LoRA files")
    if state.trainable:
        raise ValueError(
            f"The adapter trains layers {sorted(state.trainable)} in full, "
            "which KerasHub's LoRA file cannot hold (only LoRA factors). "
            "Adapt with `trainable_layers=[]` to leave them as they are, or "
            "save the adapter with keras_pvera.save_adapter, or as a PEFT "
            "LoRA folder (save_lora_adapter, with PEFT's modules_to_save)."
        )
    backbone = _root_backbone(model.base_model)
    name = model.active_adapter if adapter is None else adapter
    wrappers = model.adapter_registry.layers_of(name)
    targets = backbone.default_lora_layer_names()
    layers = lora_layers(backbone)
    by_base = {id(w.base_layer): (path, w) for path, w in wrappers.items()}
    factors, written = {}, set()
    for index, layer in layers.items():
        shape = keras_internals.kernel_shape(layer)
        held = by_base.get(id(layer))
        if held is None:
            factors[index] = (np.zeros(shape[:-1] + (0,)), np.zeros((0, shape[-1])))
            continue
        written.add(held[0])
        factors[index] = _exact_factors(held[1], name, shape)
    missing = [path for path in wrappers if path not in written]
    if missing:
        raise ValueError(
            f"Adapted layers {missing} are not layers that KerasHub's LoRA "
            f"adapts: backbone.enable_lora() adapts the layers of "
            f"{backbone.name!r} named {targets}. KerasHub's LoRA file "
            "numbers its layers instead of naming them, so it holds no "
            "others. Adapt only those layers (keras_pvera.apply's default "
            "target), or write a PEFT LoRA folder (save_lora_adapter) or a "
            "keras_pvera adapter file (save_adapter)."
        )
    rank = max([1] + [a.shape[-1] for a, _ in factors.values()])
    with safetensors_io.atomic_path(os.fspath(path)) as tmp:
        store = keras_internals.h5_store(tmp, "w")
        try:
            store.make("lora")["rank"] = rank
            for index, (a, b) in factors.items():
                entry = store.make(f"lora/{index}")
                entry["lora_kernel_a"] = _padded(a, rank, axis=-1)
                entry["lora_kernel_b"] = _padded(b, rank, axis=0)
        finally:
            store.close()


def lora_layers(backbone):
    """`{index: layer}` of the layers KerasHub's `enable_lora()` adapts.

    The index is the layer's place among the backbone's layers with weights,
    as KerasHub numbers them, counted as in the backbone before it was
    adapted: a wrapper (PVeRA's, or a layer trained in full) counts as the
    layer it wraps.

    Args:
        backbone: A KerasHub backbone, adapted or not.

    Returns:
        A dict from index to the (unwrapped) layer, in index order.
    """
    hidden = set()
    for layer in keras_internals.flatten_layers(backbone):
        if isinstance(layer, AsWrappedLayer):
            inner = layer.wrapped_layer()
            kept = {id(inner)} | {id(x) for x in keras_internals.flatten_layers(inner)}
            hidden |= {id(layer)} | {
                id(x)
                for x in keras_internals.flatten_layers(layer)
                if id(x) not in kept
            }
    layers = [
        layer
        for layer in keras_internals.flatten_layers(backbone)
        if id(layer) not in hidden and layer.weights
    ]
    names = set(backbone.default_lora_layer_names())
    return {
        index: layer
        for index, layer in enumerate(layers)
        if layer.name in names and hasattr(layer, "enable_lora")
    }


def _exact_factors(wrapper, adapter, shape):
    """Keras LoRA factors `(a, b)` whose product is the adapter's mean delta
    kernel, of the smallest rank this layout allows."""
    linear = wrapper.linear
    rank = wrapper.adapter_vectors[adapter].config.rank
    whole_output_last = (
        isinstance(linear, LinearEquation)
        and linear.out_dims == [shape[-1]]
        and linear.to_kernel_order == sorted(linear.to_kernel_order)
    )
    if whole_output_last and rank <= shape[-1]:
        down, up = (_numpy(f) for f in wrapper.mean_factors(adapter))
        return down.reshape(shape[:-1] + (rank,)), up
    delta = _numpy(wrapper.delta_kernel(adapter))
    return delta, np.eye(shape[-1], dtype="float32")


def _padded(array, rank, axis):
    """`array` with zeros appended along `axis` up to size `rank`, float32."""
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, rank - array.shape[axis])
    return np.pad(np.asarray(array, "float32"), widths)


def _root_backbone(model):
    backbones = keras_hub_backbones(model)
    if not backbones:
        raise ValueError(
            f"KerasHub's LoRA file belongs to a KerasHub backbone, and model "
            f"{model.name!r} ({type(model).__name__}) holds none. Write a "
            "keras_pvera adapter file (save_adapter) instead."
        )
    return backbones[0]


def _numpy(tensor):
    return np.asarray(keras.ops.convert_to_numpy(tensor), "float32")
