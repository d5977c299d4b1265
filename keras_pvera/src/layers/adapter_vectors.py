"""`AdapterVectors`: what an adapted layer holds for one named adapter."""


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
