"""Fused groups: split layers that compute one adapter of a fused map.

A model whose fused `Dense(3 * h)` is split into three `Dense(h)` (as
KerasHub splits GPT-2's `c_attn` into query, key and value) and adapted with
the three as a fused group must compute exactly what the fused layer's
adapter computes: the same mean, the same samples, the same gradients.
"""

import keras
import numpy as np
import pytest

import keras_pvera
from keras_pvera.src.layers.pvera_config import PVeRAConfig

IN, PART, RANK = 6, 4, 3
PARTS = ("query", "key", "value")
GROUP = [f"split/{name}" for name in PARTS]


def fused_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, IN))
    fused = keras.layers.Dense(3 * PART, name="fused")(inputs)
    return keras.Model(inputs, fused, name="fused_model")


class Split(keras.layers.Layer):
    """Three Dense layers whose outputs concatenate: one fused map."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.parts = [keras.layers.Dense(PART, name=name) for name in PARTS]

    def build(self, input_shape):
        for part in self.parts:
            part.build(input_shape)

    def call(self, x):
        return keras.ops.concatenate([part(x) for part in self.parts], axis=-1)


def split_model(fused):
    inputs = keras.Input((5, IN))
    split = Split(name="split")
    model = keras.Model(inputs, split(inputs), name="split_model")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in fused.weights[:2])
    for i, part in enumerate(split.parts):
        cols = slice(i * PART, (i + 1) * PART)
        part.kernel.assign(kernel[:, cols])
        part.bias.assign(bias[cols])
    return model


def adapted_pair(seed, **settings):
    """The fused model and its split copy, adapted alike, with random vectors."""
    fused = keras_pvera.apply(
        fused_model(), rank=RANK, seed=seed, target=["fused"], **settings
    )
    split = keras_pvera.apply(
        split_model(fused_model()),
        rank=RANK,
        seed=seed,
        target=r"split/(query|key|value)",
        fused_groups=[GROUP],
        **settings,
    )
    rng = np.random.default_rng(seed)
    layer = fused.adapted_layers["fused"]
    layer.lambda_d.assign(rng.normal(size=2 * RANK).astype("float32"))
    layer.lambda_b.assign(rng.normal(size=3 * PART).astype("float32"))
    vector_b = keras.ops.convert_to_numpy(layer.lambda_b)
    for i, path in enumerate(GROUP):
        part = split.adapted_layers[path]
        part.lambda_d.assign(keras.ops.convert_to_numpy(layer.lambda_d))
        part.lambda_b.assign(vector_b[i * PART : (i + 1) * PART])
    return fused, split


def inputs():
    return np.random.default_rng(1).normal(size=(2, 5, IN)).astype("float32")


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.mark.parametrize("seed", [0, 7])
def test_group_shares_one_lambda_d_and_reads_rows_of_b(seed):
    fused, split = adapted_pair(seed)
    layers = [split.adapted_layers[path] for path in GROUP]
    assert layers[1].lambda_d is layers[0].lambda_d is layers[2].lambda_d
    names = [w.path for w in split.trainable_weights]
    assert sum(name.endswith("pvera_lambda_d") for name in names) == 1
    assert sum(name.endswith("pvera_lambda_b") for name in names) == 3
    registry = split.projection_registry
    assert tuple(registry.projection_b.shape) == (3 * PART, RANK)
    np.testing.assert_array_equal(
        numpy(registry.projection_b), numpy(fused.projection_registry.projection_b)
    )
    np.testing.assert_allclose(
        numpy(split(inputs())), numpy(fused(inputs())), atol=1e-5
    )


@pytest.mark.parametrize("seed", [0, 7])
def test_group_draws_one_latent_sample(seed):
    """Sampling: the three parts use one noise draw, as the fused layer."""
    fused, split = adapted_pair(seed, sample_at_inference=True)
    samples = []
    for _ in range(2):
        samples.append(numpy(fused(inputs())))
        np.testing.assert_allclose(numpy(split(inputs())), samples[-1], atol=1e-5)
    assert np.abs(samples[0] - samples[1]).max() > 1e-3  # it does sample


@pytest.mark.parametrize("seed", [0, 7])
def test_group_trains_as_the_fused_layer(seed):
    fused, split = adapted_pair(seed)
    x = inputs()
    y = np.zeros((2, 5, 3 * PART), "float32")
    for model in (fused, split):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, epochs=2, batch_size=2, verbose=0, shuffle=False)
    layer = fused.adapted_layers["fused"]
    parts = [split.adapted_layers[path] for path in GROUP]
    np.testing.assert_allclose(
        numpy(parts[0].lambda_d), numpy(layer.lambda_d), atol=1e-5
    )
    np.testing.assert_allclose(
        np.concatenate([numpy(p.lambda_b) for p in parts]),
        numpy(layer.lambda_b),
        atol=1e-5,
    )


def test_group_survives_keras_saving_and_adapter_files(tmp_path):
    fused, split = adapted_pair(3)
    expected = numpy(split(inputs()))
    split.save(tmp_path / "split.keras")
    again = keras.saving.load_model(
        tmp_path / "split.keras", custom_objects={"Split": Split}
    )
    np.testing.assert_allclose(numpy(again(inputs())), expected, atol=1e-6)
    layers = [again.adapted_layers[path] for path in GROUP]
    assert layers[2].lambda_d is layers[0].lambda_d

    keras_pvera.save_adapter(split, tmp_path / "split.safetensors")
    loaded = keras_pvera.load_adapter(
        split_model(fused_model()), tmp_path / "split.safetensors"
    )
    assert loaded.pvera_config.fused_groups == (tuple(GROUP),)
    np.testing.assert_allclose(numpy(loaded(inputs())), expected, atol=1e-6)


def test_merge_folds_each_part_with_its_rows(tmp_path):
    fused, split = adapted_pair(5)
    expected = numpy(fused(inputs()))
    split.merge_adapter()
    np.testing.assert_allclose(numpy(split(inputs())), expected, atol=1e-5)


@pytest.mark.parametrize(
    "groups, message",
    [
        ([["split/query"]], "at least two layer paths"),
        ([GROUP, ["split/query", "split/key"]], "each path in one group"),
        ("split/query", "list of lists"),
    ],
)
def test_bad_groups_are_refused(groups, message):
    with pytest.raises(ValueError, match=message):
        PVeRAConfig(fused_groups=groups)


def test_group_of_layers_not_adapted_is_refused():
    base = split_model(fused_model())
    with pytest.raises(ValueError, match="does not adapt"):
        keras_pvera.apply(
            base, rank=RANK, target=r"split/(query|key)", fused_groups=[GROUP]
        )


def test_a_fused_adapter_does_not_load_into_separate_layers(tmp_path):
    fused, split = adapted_pair(2)
    keras_pvera.save_adapter(split, tmp_path / "grouped.safetensors")
    separate = keras_pvera.apply(
        split_model(fused_model()), rank=RANK, seed=2, target=r"split/.*"
    )
    with pytest.raises(ValueError, match="fused groups"):
        keras_pvera.load_adapter(separate, tmp_path / "grouped.safetensors")
