"""PVeRA on top of a base model quantized with Keras' `model.quantize`.

Quantize the base model first, then `keras_pvera.apply`: the adapters run
beside the quantized layers (which compute their own outputs), only the
PVeRA vectors train, the quantized kernels stay as they are, and the
`.keras` file round-trips. int8 and float8 on every Keras from 3.12; int4
(per channel and in blocks), GPTQ and AWQ on Keras 3.15, whose packed int4
kernels are not stored in the float kernel's shape. A quantized base is
not merged: the adapter goes to the float base through its adapter file.
"""

import gc

import keras
import numpy as np
import pytest

import keras_pvera

KERAS_VERSION = tuple(int(part) for part in keras.version().split(".")[:2])
needs_keras_3_15 = pytest.mark.skipif(
    KERAS_VERSION < (3, 15),
    reason="int4 block configs, GPTQ and AWQ as Keras 3.15 stores them",
)


def make_base():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    x = keras.layers.EinsumDense("ab,bc->ac", 16, activation="relu", name="mixer")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def frozen_values(model):
    """Every non-PVeRA variable: quantized kernels, scales, biases, and
    float8's scale and amax history (frozen with the layer)."""
    return {
        v.path: keras.ops.convert_to_numpy(v).copy()
        for v in model.weights
        if "pvera_lambda" not in v.path
    }


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    return x, rng.integers(0, 3, size=(64,))


def quantize(model, mode, block_size=None):
    """`model.quantize(mode)`; int4 with `block_size` (-1: one scale per
    output unit) through Keras 3.15's `Int4QuantizationConfig`."""
    config = None
    if block_size is not None:
        config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
    model.quantize(mode, config=config)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, block_size",
    [
        ("int8", None),
        ("float8", None),
        pytest.param("int4", -1, marks=needs_keras_3_15, id="int4-per-channel"),
        pytest.param("int4", 4, marks=needs_keras_3_15, id="int4-blocks-of-4"),
    ],
)
def test_apply_and_fit_on_a_quantized_base(mode, block_size, tmp_path):
    base = make_base()
    quantize(base, mode, block_size)
    assert base.get_layer("hidden").quantization_mode == mode
    x, y = data()
    base_predictions = base.predict(x, verbose=0)

    model = keras_pvera.apply(base, rank=8, target=["hidden", "mixer"])
    np.testing.assert_array_equal(model.predict(x, verbose=0), base_predictions)
    # The adapters have the float layers' sizes, whatever the kernels' storage
    # (int4 packs two values a byte: hidden's kernel is stored as (8, 16)).
    hidden, mixer = model.adapted_layers["hidden"], model.adapted_layers["mixer"]
    assert (hidden.in_dim, hidden.out_dim, mixer.in_dim, mixer.out_dim) == (
        8,
        32,
        32,
        16,
    )
    assert tuple(hidden.lambda_b.shape) == (32,)
    if mode in ("int8", "int4"):
        kernel = hidden.base_layer._kernel
        assert keras.backend.standardize_dtype(kernel.dtype) == "int8"
        assert tuple(kernel.shape) == ((8, 32) if mode == "int8" else (8, 16))
    before = frozen_values(model)
    assert [v.path for v in model.trainable_weights] == [
        "hidden/pvera_lambda_d",
        "hidden/pvera_lambda_b",
        "mixer/pvera_lambda_d",
        "mixer/pvera_lambda_b",
    ]

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for layer in model.adapted_layers.values():
        assert np.any(keras.ops.convert_to_numpy(layer.lambda_b) != 0)  # trained
    after = frozen_values(model)
    assert sorted(after) == sorted(before)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    predictions = model.predict(x, verbose=0)
    assert np.max(np.abs(predictions - base_predictions)) > 1e-3

    model.save(tmp_path / "quantized.keras")
    loaded = keras.models.load_model(tmp_path / "quantized.keras")
    assert loaded.adapted_layers["hidden"].base_layer.quantization_mode == mode
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), predictions)
    for path, value in frozen_values(loaded).items():
        np.testing.assert_array_equal(value, after[path], err_msg=path)


def test_quantizing_after_apply_raises_and_names_the_fix():
    model = keras_pvera.apply(make_base(), rank=8)
    x, _ = data()
    before = model.predict(x, verbose=0)
    with pytest.raises(ValueError, match="before keras_pvera.apply"):
        model.quantize("int8")
    hidden = model.adapted_layers["hidden"].base_layer
    assert hidden.quantization_mode is None
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)


@needs_keras_3_15
def test_an_adapter_trained_on_an_int4_base_merges_through_the_float_base(
    tmp_path,
):
    base = make_base()
    float_weights = base.get_weights()
    quantize(base, "int4", block_size=4)
    model = keras_pvera.apply(base, rank=8, target=["hidden", "mixer"])
    rng = np.random.default_rng(0)
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(rng.normal(size=layer.out_dim).astype("float32"))
    with pytest.raises(ValueError, match=r"mode='int4'.*load_adapter\(float_base"):
        keras_pvera.merge(model)
    with pytest.raises(ValueError, match="mode='int4'"):
        model.merge_adapter()
    assert model.merged_adapters == []

    path = str(tmp_path / "adapter.safetensors")
    keras_pvera.save_adapter(model, path)
    float_base = make_base()
    float_base.set_weights(float_weights)
    on_float = keras_pvera.load_adapter(float_base, path)
    for name, layer in model.adapted_layers.items():
        for trained, loaded in zip(
            layer.trainable_weights,
            on_float.adapted_layers[name].trainable_weights,
            strict=True,
        ):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(loaded), keras.ops.convert_to_numpy(trained)
            )
    merged = keras_pvera.merge(on_float)
    assert all(
        layer.quantization_mode is None
        for layer in merged.layers
        if hasattr(layer, "quantization_mode")
    )
    x, _ = data()
    np.testing.assert_allclose(
        merged.predict(x, verbose=0), on_float.predict(x, verbose=0), atol=1e-5
    )


class Int2Dense(keras.layers.Dense):
    """A Dense layer claiming a quantization mode PVeRA does not know."""

    @property
    def quantization_mode(self):
        return "int2"


def test_an_unknown_quantization_mode_is_refused_by_name():
    layer = keras.layers.Dense(4)
    layer.build((None, 3))
    layer.__class__ = Int2Dense  # Built as float: Keras knows no int2 build.
    with pytest.raises(ValueError, match=r"mode='int2'.*'int4', 'gptq', 'awq'"):
        keras_pvera.PVeRADense(layer, rank=2)


TEXTS = ["the cat sat on the mat", "a dog ran", "the dog sat on a cat", "a cat ran"]


def tiny_gpt2_causal_lm():
    """A one-block GPT-2 `CausalLM` with its preprocessor, random weights
    and a (nearly) character-level byte-pair tokenizer made in memory."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    characters = sorted(set("".join(TEXTS)) - {" "})
    vocabulary = {"<|endoftext|>": 0, "Ġ": 1}
    vocabulary.update({c: i + 2 for i, c in enumerate(characters)})
    vocabulary.update({"Ġt": len(vocabulary), "Ġth": len(vocabulary) + 1})
    merges = ["Ġ t", "Ġt h"]  # KerasHub's tokenizer needs at least one.
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=8
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


@pytest.mark.slow
@needs_keras_3_15
# The torch run only: Keras' GPTQ and AWQ calibration and this model's
# training compile for one to three minutes on JAX and TensorFlow here
# (both pass there, 2026-11-29), and the adapter's path beside a packed
# 4-bit kernel runs on every backend in the int4 cases above.
@pytest.mark.default_backend_only
@pytest.mark.parametrize("mode", ["gptq", "awq"])
def test_apply_and_fit_on_a_gptq_or_awq_causal_lm(mode, tmp_path, monkeypatch):
    causal_lm = tiny_gpt2_causal_lm()
    config_class = {
        "gptq": keras.quantizers.GPTQConfig,
        "awq": keras.quantizers.AWQConfig,
    }[mode]
    config = config_class(
        dataset=TEXTS,
        tokenizer=causal_lm.preprocessor.tokenizer,
        num_samples=4,
        sequence_length=8,
        group_size=4,
    )
    # The tokenizer builds on first use; Keras' `quantize` refuses unbuilt
    # layers (on JAX the preprocessor's tokenizer is not built before).
    x, y, sample_weight = causal_lm.preprocessor(TEXTS)
    # Keras runs a full `gc.collect()` for each kernel it replaces (seconds
    # each in a large test process); it frees nothing this test needs.
    with monkeypatch.context() as patch:
        patch.setattr(gc, "collect", lambda *args: 0)
        causal_lm.quantize(mode, config=config)
    # The tokenizer served the calibration; the adapted task then runs on
    # token ids (training on raw text is tests/hub's, and costs seconds of
    # tf.data here).
    causal_lm.preprocessor = None
    base_logits = keras.ops.convert_to_numpy(causal_lm(x))
    causal_lm.save(tmp_path / "base.keras")
    try:
        keras.models.load_model(tmp_path / "base.keras")
        keras_reloads = True
    except ValueError:
        # Keras 3.15.1 saves one variable fewer than it reads back for GPTQ
        # and AWQ layers: a quantized model's `.keras` file does not load.
        keras_reloads = False

    model = keras_pvera.apply(causal_lm, rank=4, target="all")
    sizes = {
        "query": (8, 8),
        "key": (8, 8),
        "value": (8, 8),
        "attention_output": (8, 8),
        "feedforward_intermediate_dense": (8, 16),
        "feedforward_output_dense": (16, 8),
    }
    assert {
        path.rsplit("/", 1)[1]: (layer.in_dim, layer.out_dim)
        for path, layer in model.adapted_layers.items()
    } == sizes
    for layer in model.adapted_layers.values():
        assert layer.base_layer.quantization_mode == mode
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), base_logits)

    before = frozen_values(model)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    history = model.fit(
        x, y, sample_weight=sample_weight, epochs=2, batch_size=2, verbose=0
    )
    assert np.all(np.isfinite(history.history["loss"]))
    after = frozen_values(model)
    assert sorted(after) == sorted(before)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    logits = keras.ops.convert_to_numpy(model(x))
    assert np.max(np.abs(logits - base_logits)) > 1e-4

    # The adapter file round trips onto the quantized model.
    path = str(tmp_path / "adapter.safetensors")
    keras_pvera.save_adapter(model, path)
    for layer in model.adapted_layers.values():
        layer.lambda_b.assign(np.zeros(layer.out_dim, "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), base_logits)
    keras_pvera.load_adapter(model, path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), logits)

    model.save(tmp_path / "adapted.keras")
    if keras_reloads:
        loaded = keras.models.load_model(tmp_path / "adapted.keras")
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), logits)
    else:  # As the base model's file: Keras' own layers do not load.
        with pytest.raises(ValueError, match="could not be loaded"):
            keras.models.load_model(tmp_path / "adapted.keras")
    with pytest.raises(ValueError, match=f"mode='{mode}'"):
        keras_pvera.merge(model)
