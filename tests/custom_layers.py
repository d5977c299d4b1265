"""Layers the tests build models from, importable without keras_pvera."""

import keras


@keras.saving.register_keras_serializable(package="lifecycle_test")
class Block(keras.layers.Layer):
    """A container layer: two Dense layers and a LayerNormalization."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, activation="relu", name="inner")
        self.outer = keras.layers.Dense(units, name="outer")
        self.norm = keras.layers.LayerNormalization(name="norm")

    def build(self, input_shape):
        hidden_shape = tuple(input_shape[:-1]) + (self.units,)
        self.inner.build(input_shape)
        self.outer.build(hidden_shape)
        self.norm.build(hidden_shape)

    def call(self, x):
        return self.norm(self.outer(self.inner(x)))

    def get_config(self):
        return {**super().get_config(), "units": self.units}
