"""`AdapterVectors`: what an adapted layer holds for one named adapter,
and how a layer's adapter joins a fused group (`join_fused_group`)."""

from keras_pvera.src.utils import keras_internals


class AdapterVectors:
    """One named adapter inside a `PVeRADense` layer: its settings and vectors.

    A plain object (not a Keras layer): the layer owns the variables.

    Args:
        config: The adapter's `PVeRAConfig`.
        lambda_d: The `(2 * rank,)` variable, or `None` before the layer is
            built.
        lambda_b: The `(out,)` variable, or `None` before the layer is built.

    A layer of a fused group (`PVeRAConfig.fused_groups`) reads rows
    `[out_offset, out_offset + out)` of `B`; all but the group's first layer
    hold the first layer's `lambda_d` (`shared_lambda_d` is then true) and do
    not track it, so it is saved and trained once.
    """

    def __init__(self, config, lambda_d=None, lambda_b=None):
        self.config = config
        self.lambda_d = lambda_d
        self.lambda_b = lambda_b
        self.out_offset = 0
        self.shared_lambda_d = False

    @property
    def weights(self):
        return [self.lambda_d, self.lambda_b]


def join_fused_group(layer, adapter_name, out_offset, first=None):
    """Makes `layer`'s adapter `adapter_name` one part of a fused linear map.

    The layer then reads rows `[out_offset, out_offset + out)` of `B`,
    and, unless it is the group's first layer, uses `first`'s `lambda_d`
    variable (its own is dropped). With the group's layers reading the
    same input and drawing the same noise (same `noise_seed`), the group
    computes one latent sample, as the fused map's adapter does. Called by
    the adapter registry for `PVeRAConfig.fused_groups`.

    Args:
        layer: A `PVeRADense` holding `adapter_name`.
        adapter_name: One of the layer's `adapter_names`.
        out_offset: The layer's first row in the fused map.
        first: The group's first `PVeRADense` (`None` for that layer).

    Raises:
        ValueError: If `first` draws other noise (another `noise_seed`),
            or its `lambda_d` has another shape.
    """
    vectors = layer._vectors_named(adapter_name)
    vectors.out_offset = int(out_offset)
    if first is None:
        return
    if first.noise_seed != layer.noise_seed:
        raise ValueError(
            f"Layers {first.name!r} and {layer.name!r} of a fused group "
            "must draw the same noise, but were wrapped with noise seeds "
            f"{first.noise_seed} and {layer.noise_seed} (by an earlier "
            "adapter that did not group them). Adapt the base model again "
            "with the group in the first adapter."
        )
    shared = first.adapter_vectors[adapter_name].lambda_d
    if tuple(shared.shape) != tuple(vectors.lambda_d.shape):
        raise ValueError(
            f"Layer {first.name!r}'s lambda_d has shape "
            f"{tuple(shared.shape)}; layer {layer.name!r} needs "
            f"{tuple(vectors.lambda_d.shape)}."
        )
    if not vectors.shared_lambda_d:
        keras_internals.untrack_variable(layer, vectors.lambda_d)
    vectors.lambda_d = shared
    vectors.shared_lambda_d = True
