"""The adapter lifecycle, as a PEFT user knows it: named adapters, disable,
unload, merge and unmerge in place, and a base that stays frozen."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from builders import small_mlp
from custom_layers import Block

import keras_pvera
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.surgery.layer_selection import adaptable_layers


def base_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    h = Block(name="block")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="net")


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, rng.integers(0, 3, size=n)


def randomize(model, adapter=None, seed=1):
    name = adapter or model.active_adapter
    rng = np.random.default_rng(seed)
    for layer in model.adapter_registry.layers_of(name).values():
        vectors = layer.adapter_vectors[name]
        rank = vectors.config.rank
        vectors.lambda_b.assign(rng.normal(size=layer.out_dim).astype("float32"))
        vectors.lambda_d.assign(rng.normal(size=2 * rank).astype("float32") + 1.0)


def values(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def trained_names(model):
    return sorted(v.path for v in model.trainable_weights)


def fit(model, epochs=2):
    x, y = data()
    model.compile(
        optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy"
    )
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)


# Named adapters.


def test_a_second_adapter_is_added_inactive_and_switched_to():
    model = keras_pvera.apply(base_model(), rank=4, target=["hidden", "inner"])
    model.add_adapter("second", rank=4, target=["hidden", "outer"], d_initial=0.5)
    assert model.adapter_names == ["default", "second"]
    assert model.active_adapter == "default"
    assert list(model.adapted_layers) == ["hidden", "block/inner"]
    model.set_adapter("second")
    assert model.active_adapter == "second"
    assert list(model.adapted_layers) == ["hidden", "block/outer"]
    assert model.pvera_config.d_initial == 0.5
    # One registry for all: both adapters read the same A and B.
    hidden = model.adapted_layers["hidden"]
    assert hidden.projection_registry is model.projection_registry
    assert hidden.adapter_names == ["default", "second"]


def test_each_adapter_computes_with_its_own_vectors():
    x, _ = data(5)
    model = keras_pvera.apply(base_model(), rank=4, target=["hidden"])
    randomize(model, seed=1)
    first = model.predict(x, verbose=0)
    model.add_adapter("second", rank=4, target=["hidden"])
    randomize(model, "second", seed=2)
    assert np.array_equal(model.predict(x, verbose=0), first)
    model.set_adapter("second")
    second = model.predict(x, verbose=0)
    assert np.abs(second - first).max() > 1e-3
    model.set_adapter("default")
    np.testing.assert_array_equal(model.predict(x, verbose=0), first)


def test_training_trains_only_the_active_adapter():
    model = keras_pvera.apply(base_model(), rank=4, target=["hidden", "inner"])
    model.add_adapter("second", rank=4, target=["hidden", "outer"])
    model.set_adapter("second")
    assert sorted("/".join(n.split("/")[-2:]) for n in trained_names(model)) == [
        "hidden/pvera_lambda_b_second",
        "hidden/pvera_lambda_d_second",
        "outer/pvera_lambda_b_second",
        "outer/pvera_lambda_d_second",
    ]
    others = [v for v in model.weights if "second" not in v.path]
    before = values(others)
    second = [v for v in model.weights if "second" in v.path]
    second_before = values(second)
    fit(model)
    for a, b in zip(values(others), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(values(second), second_before, strict=True)
    )


def test_adapters_must_fit_the_shared_registry():
    # As in PEFT: one seed, one rank, and layers no larger than the first
    # adapter's (the projections' values depend on all three).
    model = keras_pvera.apply(base_model(), rank=4, seed=1, target=["hidden"])
    with pytest.raises(ValueError, match="seed=2.*seed=1"):
        model.add_adapter("a", rank=4, seed=2, target=["hidden"])
    with pytest.raises(ValueError, match="rank=8.*rank=4"):
        model.add_adapter("b", rank=8, seed=1, target=["hidden"])
    with pytest.raises(ValueError, match="'block/inner' \\(8 -> 8\\)"):
        model.add_adapter("c", rank=4, seed=1, target=["inner"])
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        model.add_adapter("default", rank=4, seed=1, target=["hidden"])
    with pytest.raises(ValueError, match="both a PVeRA target and in"):
        model.add_adapter(
            "d", rank=4, seed=1, target=["hidden"], trainable_layers=["hidden"]
        )
    assert model.adapter_names == ["default"]
    assert model.adapted_layers["hidden"].adapter_names == ["default"]
    assert not any(
        isinstance(layer, PVeRADense) and layer.name == "inner"
        for _, layer in adaptable_layers(model.base_model)
    )


def test_delete_adapter_removes_its_vectors_and_unwraps_its_own_layers():
    x, _ = data(5)
    model = keras_pvera.apply(base_model(), rank=4, target=["hidden", "inner"])
    randomize(model)
    expected = model.predict(x, verbose=0)
    model.add_adapter("second", rank=4, target=["hidden", "outer"])
    model.set_adapter("second")
    # As PEFT: deleting the active adapter makes a remaining one active.
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        model.delete_adapter("second")
    assert model.adapter_names == ["default"] and model.active_adapter == "default"
    layers = dict(adaptable_layers(model.base_model))
    assert type(layers["block/outer"]) is keras.layers.Dense
    assert not any("second" in v.path for v in model.weights)
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    with pytest.raises(ValueError, match="No adapter named 'missing'"):
        model.set_adapter("missing")


def test_keras_file_keeps_every_adapter_and_the_active_one(tmp_path):
    x, _ = data(5)
    model = keras_pvera.apply(base_model(), rank=4, target=["hidden", "inner"])
    randomize(model, seed=1)
    model.add_adapter("second", rank=4, target=["hidden", "outer"], alpha=2.0)
    randomize(model, "second", seed=2)
    model.set_adapter("second")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "two.keras")

    loaded = keras.saving.load_model(tmp_path / "two.keras")
    assert loaded.adapter_names == ["default", "second"]
    assert loaded.active_adapter == "second"
    assert loaded.pvera_config.alpha == 2.0
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    loaded.set_adapter("default")
    model.set_adapter("default")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_adapter_files_by_name(tmp_path):
    x, _ = data(5)
    model = keras_pvera.apply(base_model(), rank=4, target=["inner"])
    model.add_adapter("second", rank=4, target=["outer"])
    randomize(model, "second", seed=3)
    keras_pvera.save_adapter(model, tmp_path / "second.safetensors", adapter="second")
    model.set_adapter("second")
    expected = model.predict(x, verbose=0)

    fresh = keras_pvera.apply(base_model(), rank=4, target=["inner"])
    keras_pvera.load_adapter(fresh, tmp_path / "second.safetensors", adapter="second")
    assert fresh.adapter_names == ["default", "second"]
    assert fresh.active_adapter == "default"
    fresh.set_adapter("second")
    np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, atol=1e-6)

    on_base = keras_pvera.load_adapter(
        base_model(), tmp_path / "second.safetensors", adapter="second"
    )
    assert on_base.adapter_names == ["second"]
    np.testing.assert_allclose(on_base.predict(x, verbose=0), expected, atol=1e-6)
    with pytest.raises(ValueError, match="no adapter named 'third'"):
        keras_pvera.save_adapter(model, tmp_path / "x.safetensors", adapter="third")


# The base model back.


def test_disable_adapter_gives_the_base_outputs_bitwise():
    x, _ = data(7)
    base = base_model()
    expected = base.predict(x, verbose=0)
    # Eager calls are compared with eager calls: XLA may fuse a compiled
    # predict differently from eager ops on JAX.
    expected_eager = keras.ops.convert_to_numpy(base(x, training=False))
    model = keras_pvera.apply(base, rank=4, target="all")
    randomize(model)
    adapted = model.predict(x, verbose=0)
    assert np.abs(adapted - expected).max() > 1e-3
    with model.disable_adapter():
        np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(model(x, training=False)), expected_eager
        )
    np.testing.assert_array_equal(model.predict(x, verbose=0), adapted)
    with pytest.raises(RuntimeError, match="inside"):
        with model.disable_adapter():
            raise RuntimeError("inside")
    np.testing.assert_array_equal(model.predict(x, verbose=0), adapted)


def test_unload_returns_the_original_model():
    x, y = data(7)
    base = base_model()
    expected = base.predict(x, verbose=0)
    trainable_before = trained_names(base)
    original = {p: layer for p, layer in adaptable_layers(base)}
    model = keras_pvera.apply(base, rank=4, target="all")
    model.add_adapter("second", rank=4, target=["hidden"])
    randomize(model)
    returned = model.unload()
    assert returned is base
    after = dict(adaptable_layers(base))
    assert after.keys() == original.keys()
    assert all(after[p] is original[p] for p in original)
    assert base.get_layer("hidden").activation is keras.activations.relu
    assert trained_names(base) == trainable_before
    np.testing.assert_array_equal(base.predict(x, verbose=0), expected)
    base.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    base.fit(x, y, epochs=1, verbose=0)


@pytest.mark.slow
def test_an_unloaded_model_loads_without_keras_pvera(tmp_path):
    x, _ = data(3)
    model = keras_pvera.apply(base_model(), rank=4, target="all")
    base = model.unload()
    base.save(tmp_path / "base.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", base.predict(x, verbose=0))
    script = (
        "import sys, numpy as np, keras\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})\n"
        "import custom_layers  # registers Block\n"
        f"m = keras.saving.load_model({str(tmp_path / 'base.keras')!r})\n"
        "assert 'keras_pvera' not in sys.modules, 'keras_pvera was imported'\n"
        f"y = m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)\n"
        f"assert np.array_equal(y, np.load({str(tmp_path / 'y.npy')!r}))\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# Merging in place.


def test_merge_and_unmerge_in_place():
    x, _ = data(7)
    model = keras_pvera.apply(base_model(), rank=4, target="all", alpha=2.0)
    randomize(model)
    kernels = {
        p: keras.ops.convert_to_numpy(layer.base_layer.kernel).copy()
        for p, layer in model.adapted_layers.items()
    }
    expected = model.predict(x, verbose=0)
    model.merge_adapter()
    assert model.merged_adapter == "default"
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    for p, layer in model.adapted_layers.items():
        merged = keras.ops.convert_to_numpy(layer.base_layer.kernel)
        delta = keras.ops.convert_to_numpy(layer.delta_kernel())
        np.testing.assert_allclose(merged, kernels[p] + delta, atol=1e-6)
    model.unmerge_adapter()
    assert model.merged_adapter is None
    for p, layer in model.adapted_layers.items():
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer.base_layer.kernel), kernels[p], atol=1e-6
        )
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-6)


def test_training_sampling_and_switching_are_refused_while_merged():
    model = keras_pvera.apply(base_model(), rank=4, target=["hidden"])
    model.add_adapter("second", rank=4, target=["hidden"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged.*unmerge_adapter"):
        fit(model)
    with pytest.raises(ValueError, match="merged"):
        model.sample_at_inference = True
    with pytest.raises(ValueError, match="merged"):
        model.predict_with_uncertainty(data(2)[0], n=2, verbose=0)
    with pytest.raises(ValueError, match="merged"):
        model(data(2)[0], training=True)
    # As PEFT: switching adapters unmerges first, with a warning.
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        model.set_adapter("second")
    assert model.merged_adapters == [] and model.active_adapter == "second"
    fit(model, epochs=1)


@pytest.mark.parametrize("in_place", [True, False])
def test_safe_merge_refuses_non_finite_vectors_and_names_the_layers(in_place):
    model = keras_pvera.apply(base_model(), rank=4, target="all")
    layer = model.adapted_layers["block/inner"]
    layer.lambda_b.assign(np.full(8, np.inf, "float32"))
    before = keras.ops.convert_to_numpy(layer.base_layer.kernel).copy()
    with pytest.raises(ValueError, match="\\['block/inner'\\]"):
        if in_place:
            model.merge_adapter(safe_merge=True)
        else:
            keras_pvera.merge(model, safe_merge=True)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer.base_layer.kernel), before
    )
    assert model.merged_adapter is None


# Frozen stays frozen.


def expected_trainable(model):
    return sorted(
        v.path
        for layer in model.adapted_layers.values()
        for v in (layer.lambda_d, layer.lambda_b)
    ) + sorted(
        # The head's copy for the adapter: the original stays frozen.
        w.path
        for w in model.base_model.get_layer("head").copies["default"].weights
    )


def test_trainable_toggles_never_thaw_the_base():
    model = keras_pvera.apply(
        base_model(), rank=4, target=["hidden", "inner"], trainable_layers=["head"]
    )
    expected = sorted(expected_trainable(model))
    assert trained_names(model) == expected

    model.trainable = False
    assert model.trainable_weights == []
    model.trainable = True
    assert trained_names(model) == expected

    hidden = model.adapted_layers["hidden"]
    hidden.trainable = False
    assert trained_names(model) == sorted(
        set(expected) - {hidden.lambda_d.path, hidden.lambda_b.path}
    )
    hidden.trainable = True
    assert trained_names(model) == expected
    assert not hidden.base_layer.kernel.trainable

    block = model.base_model.get_layer("block")
    block.trainable = False
    block.trainable = True  # Keras thaws block/outer and block/norm here...
    assert trained_names(model) == expected  # ...but they never train.
    frozen = [v for v in model.weights if "block/outer" in v.path]
    before = values(frozen)
    fit(model, epochs=1)
    for a, b in zip(values(frozen), before, strict=True):
        np.testing.assert_array_equal(a, b)
    # fit put the flags back, so LayerNormalization and others read frozen.
    assert not any(v.trainable for v in frozen)


def test_switching_adapters_between_fits_trains_each_in_turn():
    model = keras_pvera.apply(base_model(), rank=4, target=["hidden"])
    model.add_adapter("second", rank=4, target=["hidden"])
    fit(model, epochs=1)  # Trains "default" and builds the optimizer.
    default = values(model.adapted_layers["hidden"].adapter_vectors["default"].weights)
    model.set_adapter("second")
    second = model.adapted_layers["hidden"].adapter_vectors["second"]
    before = values(second.weights)
    # A Keras optimizer serves the variables it was built for: the model
    # gets a fresh one of the same configuration.
    model.fit(*data(), epochs=1, batch_size=16, verbose=0)
    assert not np.array_equal(values(second.weights)[1], before[1])
    hidden = model.adapted_layers["hidden"].adapter_vectors["default"]
    for a, b in zip(values(hidden.weights), default, strict=True):
        np.testing.assert_array_equal(a, b)


# As PEFT does it (issue 18). Each test below states PEFT 0.21's behaviour;
# tests/peft/test_peft_lifecycle.py runs PEFT beside to compare outputs.


def eager(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def kernels_of(model):
    return {
        path: keras.ops.convert_to_numpy(layer.base_layer.kernel).copy()
        for path, layer in model.adapter_registry.wrappers.items()
    }


def test_disable_adapter_on_a_merged_model_gives_the_base_outputs():
    x, _ = data(7)
    base = base_model()
    expected = eager(base, x)
    model = keras_pvera.apply(base, rank=4, target="all")
    randomize(model)
    adapted = eager(model, x)
    model.merge_adapter()
    with model.disable_adapter():
        # PEFT takes the merged deltas out (it unmerges); so does this, on
        # the fly: the kernels stay merged.
        np.testing.assert_allclose(eager(model, x), expected, atol=1e-5)
        np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    assert model.merged_adapters == ["default"]
    np.testing.assert_allclose(eager(model, x), adapted, atol=1e-5)


def head_model():
    return small_mlp(name="classifier")


def test_each_adapter_trains_its_own_copy_of_a_layer_trained_in_full(tmp_path):
    x, _ = data(16)
    base = head_model()
    original = [
        keras.ops.convert_to_numpy(w).copy() for w in base.get_layer("head").weights
    ]
    base_out = eager(base, x)
    model = keras_pvera.apply(
        base, rank=4, target=["hidden"], trainable_layers=["head"]
    )
    model.add_adapter("second", rank=4, target=["hidden"], trainable_layers=["head"])
    head = model.base_model.get_layer("head")
    # PEFT's modules_to_save: the original, frozen, and one copy per adapter.
    assert head.adapter_names == ["default", "second"]
    fit(model, epochs=2)
    for a, b in zip(values(head.original_layer.weights), original, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(values(head.copies["default"].weights)[0], original[0])
    np.testing.assert_array_equal(values(head.copies["second"].weights)[0], original[0])
    trained = eager(model, x)
    with model.disable_adapter():
        # The base model back, head included, after training.
        np.testing.assert_array_equal(eager(model, x), base_out)
    model.set_adapter("second")  # Its head is still the original's copy.
    np.testing.assert_allclose(eager(model, x), base_out, atol=1e-6)
    model.set_adapter("default")
    np.testing.assert_array_equal(eager(model, x), trained)

    model.save(tmp_path / "heads.keras")
    with warnings.catch_warnings():
        # Switching adapters renewed the optimizer, built as a loaded one.
        warnings.simplefilter("error", UserWarning)
        loaded = keras.saving.load_model(tmp_path / "heads.keras")
    np.testing.assert_allclose(eager(loaded, x), trained, atol=1e-6)
    with loaded.disable_adapter():
        np.testing.assert_allclose(eager(loaded, x), base_out, atol=1e-6)

    keras_pvera.save_adapter(model, tmp_path / "default.safetensors")
    on_base = keras_pvera.load_adapter(head_model(), tmp_path / "default.safetensors")
    np.testing.assert_allclose(eager(on_base, x), trained, atol=1e-6)


def test_an_adapter_without_the_layer_runs_the_original_and_two_cannot_share_it():
    x, _ = data(5)
    base = head_model()
    base_out = eager(base, x)
    model = keras_pvera.apply(
        base, rank=4, target=["hidden"], trainable_layers=["head"]
    )
    head = model.base_model.get_layer("head")
    head.copies["default"].kernel.assign(np.ones((8, 3), "float32"))
    model.add_adapter("plain", rank=4, target=["hidden"])  # No head of its own.
    model.add_adapter("other", rank=4, target=["hidden"], trainable_layers=["head"])
    model.set_adapter("plain")
    np.testing.assert_array_equal(eager(model, x), base_out)  # lambda_b is 0.
    assert sorted(v.name for v in model.trainable_weights) == [
        "pvera_lambda_b_plain",
        "pvera_lambda_d_plain",
    ]
    with pytest.raises(ValueError, match="only one of them can be active"):
        model.set_adapter(["default", "other"])
    assert model.active_adapter == "plain"
    # Unloading keeps the active adapter's head, as PEFT's unload does.
    model.set_adapter("default")
    unloaded = model.unload()
    assert unloaded.get_layer("head") is head.original_layer
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(unloaded.get_layer("head").kernel), np.ones((8, 3))
    )


def test_leaving_disable_adapter_restores_each_layer_and_nothing_trains_inside():
    model = keras_pvera.apply(
        base_model(), rank=4, target=["hidden", "inner"], trainable_layers=["head"]
    )
    hidden = model.adapted_layers["hidden"]
    with model.disable_adapter():
        # PEFT: no adapter weight requires grad inside the context.
        assert model.trainable_weights == []
    assert len(model.trainable_weights) == 6
    hidden.adapter_enabled = False  # A mixed state.
    assert len(model.trainable_weights) == 4
    with pytest.warns(UserWarning, match="some adapter layers that are enabled"):
        with model.disable_adapter():
            pass
    assert not hidden.adapter_enabled
    assert model.adapted_layers["block/inner"].adapter_enabled
    hidden.adapter_enabled = True
    assert len(model.trainable_weights) == 6


def test_deleting_adapters_as_peft_does():
    x, _ = data(5)
    base = base_model()
    base_out = eager(base, x)
    model = keras_pvera.apply(base, rank=4, target=["hidden"])
    model.add_adapter("b", rank=4, target=["hidden"])
    model.add_adapter("a", rank=4, target=["hidden"])
    randomize(model, "b", seed=2)
    model.set_adapter("b")
    # PEFT makes the first remaining adapter, in sorted order, active.
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        model.delete_adapter("b")
    assert model.active_adapter == "a"
    model.delete_adapter("default")  # Not active: no warning, no change.
    assert model.active_adapter == "a"
    model.delete_adapter("a")  # The last one: allowed, the base model runs.
    assert model.adapter_names == [] and model.active_adapter is None
    np.testing.assert_array_equal(eager(model, x), base_out)
    with pytest.raises(ValueError, match="no adapter left to save"):
        model.get_config()
    model.add_adapter("again", rank=4, target=["hidden"])
    assert model.active_adapter == "again"


def test_a_second_merge_warns_and_changes_nothing():
    model = keras_pvera.apply(base_model(), rank=4, target="all")
    randomize(model)
    model.merge_adapter()
    merged = kernels_of(model)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        model.merge_adapter()
    for path, kernel in kernels_of(model).items():
        np.testing.assert_array_equal(kernel, merged[path])
    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()


def test_several_active_adapters_add_up_and_merge_at_once_or_in_turn(tmp_path):
    x, _ = data(7)
    base = base_model()
    base_out = eager(base, x)
    model = keras_pvera.apply(base, rank=4, target=["hidden", "inner"])
    model.add_adapter("second", rank=4, target=["hidden", "outer"])
    randomize(model, "default", seed=1)
    randomize(model, "second", seed=2)
    kernels = kernels_of(model)
    first = eager(model, x)
    model.set_adapter("second")
    second = eager(model, x)

    # A single layer: the adapters' outputs add up (as PEFT's forward loop).
    hidden = model.adapted_layers["hidden"]
    h = keras.ops.convert_to_numpy(base.get_layer("hidden").base_layer(x))
    model.set_adapter(["default", "second"])
    assert model.active_adapters == ["default", "second"]
    assert model.active_adapter == ["default", "second"]
    both_hidden = keras.ops.convert_to_numpy(hidden.base_layer(x))
    np.testing.assert_array_equal(h, both_hidden)
    both = eager(model, x)
    assert np.abs(both - first).max() > 1e-3 and np.abs(both - second).max() > 1e-3
    assert len(model.trainable_weights) == 8  # Both adapters' vectors.
    per_token = hidden._latent_path(h, x, False, "default")
    per_token = hidden._latent_path(per_token, x, False, "second")
    folded = hidden._folded_path(x)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(folded),
        keras.ops.convert_to_numpy(per_token),
        atol=1e-5,
    )

    model.merge_adapter(adapter_names=["default", "second"])
    assert model.merged_adapters == ["default", "second"]
    np.testing.assert_allclose(eager(model, x), both, atol=1e-5)
    with model.disable_adapter():
        np.testing.assert_allclose(eager(model, x), base_out, atol=1e-5)
    model.unmerge_adapter()
    for path, kernel in kernels_of(model).items():
        np.testing.assert_allclose(kernel, kernels[path], atol=1e-6)

    model.merge_adapter(["default"])
    with pytest.warns(UserWarning, match="additionally merging second"):
        model.merge_adapter(["second"])
    np.testing.assert_allclose(eager(model, x), both, atol=1e-5)
    model.unmerge_adapter()
    with pytest.raises(TypeError, match="should be a list of strings"):
        model.merge_adapter("default")

    model.save(tmp_path / "both.keras")
    loaded = keras.saving.load_model(tmp_path / "both.keras")
    assert loaded.active_adapters == ["default", "second"]
    np.testing.assert_allclose(eager(loaded, x), both, atol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras_pvera.merge(loaded)(x)), both, atol=1e-5
    )


def test_merge_refuses_non_finite_vectors_by_default():
    model = keras_pvera.apply(base_model(), rank=4, target="all")
    model.adapted_layers["block/inner"].lambda_b.assign(np.full(8, np.nan, "float32"))
    with pytest.raises(ValueError, match="\\['block/inner'\\]"):
        keras_pvera.merge(model)
    merged = keras_pvera.merge(model, safe_merge=False)  # Asked for: done.
    assert np.isnan(keras.ops.convert_to_numpy(merged(data(2)[0]))).any()
