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


@keras.saving.register_keras_serializable(package="lifecycle_test")
class SelfCompilingModel(keras.Model):
    """Compiles itself when built and overrides `compile`, as a KerasHub task.

    Keras cannot restore the compile state of such a model from a file, and
    warns when it is asked to.
    """

    def __init__(self, **kwargs):
        inputs = keras.Input((8,))
        hidden = keras.layers.Dense(16, name="hidden")(inputs)
        super().__init__(inputs, keras.layers.Dense(3, name="head")(hidden), **kwargs)
        self.compile()

    def compile(self, optimizer="adam", loss="mse", **kwargs):
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
