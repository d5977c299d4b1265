"""`AsWrappedLayer`: a wrapper checks inputs and masks as its layer does.

The PVeRA layers wrap a base layer (`PVeRADense`, `PVeRAEmbedding`) or a
layer trained in full (`TrainedCopies`), and take its place in the model.
Keras checks a layer's inputs against its `input_spec` and carries padding
masks through the layers that support masking, before and after `call`.
So that an adapted model gives the errors and masks the base model gives,
the wrapper reports the wrapped layer's `input_spec`, `supports_masking`
and `compute_mask` as its own.
"""


class AsWrappedLayer:
    """Mixin for a Keras layer wrapping one: its input checks and masking.

    A subclass (placed before `keras.layers.Layer`) defines
    `wrapped_layer()`, the layer whose checks and masks it takes on.

    Example:

    >>> import keras
    >>> class Wrapper(AsWrappedLayer, keras.layers.Layer):
    ...     def __init__(self, layer):
    ...         super().__init__()
    ...         self.layer = layer
    ...     def wrapped_layer(self):
    ...         return self.layer
    ...     def call(self, inputs):
    ...         return self.layer(inputs)
    >>> embedding = keras.layers.Embedding(10, 4, mask_zero=True)
    >>> Wrapper(embedding).supports_masking
    True
    """

    def wrapped_layer(self):
        """The wrapped layer (a subclass says which)."""
        raise NotImplementedError

    def _wrapped_or_none(self):
        # `None` while Keras' `Layer.__init__` runs, before the layer is set.
        try:
            return self.wrapped_layer()
        except AttributeError:
            return None

    @property
    def input_spec(self):
        """The wrapped layer's `input_spec`: inputs are checked as it does."""
        layer = self._wrapped_or_none()
        return None if layer is None else layer.input_spec

    @input_spec.setter
    def input_spec(self, value):
        layer = self._wrapped_or_none()
        if layer is not None:
            layer.input_spec = value

    @property
    def supports_masking(self):
        """Whether the wrapped layer supports masking."""
        layer = self._wrapped_or_none()
        return False if layer is None else layer.supports_masking

    @supports_masking.setter
    def supports_masking(self, value):
        layer = self._wrapped_or_none()
        if layer is not None:
            layer.supports_masking = value

    def compute_mask(self, inputs, previous_mask=None):
        """The mask the wrapped layer gives its outputs."""
        return self.wrapped_layer().compute_mask(inputs, previous_mask)
