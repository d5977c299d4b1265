"""The dtype policy of an adapted layer, from its base layer's."""

import keras

from keras_pvera.src.utils import keras_internals


def float_policy(dtype):
    """The wrapper's policy for a base layer's: float32 vectors, base compute.

    `"int8_from_float32"` gives `"float32"`: a quantized policy would make
    Keras dispatch the wrapper's own call to quantized kernels it does not
    have (the wrapped layer runs its quantized call itself). A float16 or
    bfloat16 base gives `"mixed_float16"` / `"mixed_bfloat16"`: the vectors
    are float32, as PEFT's `autocast_adapter_dtype=True` (its default) keeps
    them over a half-precision base, so training updates smaller than half
    precision's step are not lost, and the wrapper still computes, and
    returns, the base's dtype.
    """
    policy = keras.dtype_policies.get(dtype)
    if getattr(policy, "quantization_mode", None) is not None:
        policy = keras_internals.float_source_policy(policy)
    if policy.variable_dtype in ("float16", "bfloat16"):
        return keras.dtype_policies.get(f"mixed_{policy.variable_dtype}")
    return policy


def adapter_dtype(layer):
    """The dtype an adapted layer computes its adapter in.

    Over a float16/bfloat16 base (a `"mixed_float16"` or `"mixed_bfloat16"`
    policy, from `float_policy`) the adapter runs in float32 (PEFT's
    `autocast_adapter_dtype`): its variables are not cast to the base's
    dtype (the layer's `autocast` is turned off), and its output is rounded
    once, after the sum. Otherwise the layer's compute dtype.
    """
    if layer.dtype_policy.name in ("mixed_float16", "mixed_bfloat16"):
        layer.autocast = False
        return "float32"
    return layer.compute_dtype
