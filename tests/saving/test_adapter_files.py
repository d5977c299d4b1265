"""Adapter-only files: save_adapter / load_adapter, as a user would use them."""

import json
import os

import keras
import numpy as np
import pytest
import safetensors.numpy
from builders import randomize_vectors
from builders import tiny_bert
from conftest import SAVED_FILE_SETS
from conftest import needs_keras_3_15
from conftest import saved_file

import keras_pvera
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.surgery.layer_walk import iter_layers


def make_base(hidden=16, name="hidden"):
    """A small Functional model; the same weights every time it is built."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(
        hidden,
        activation="relu",
        name=name,
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
    )(inputs)
    x = keras.layers.Dense(
        12,
        name="middle",
        kernel_initializer=keras.initializers.GlorotUniform(seed=2),
    )(x)
    outputs = keras.layers.Dense(
        3,
        name="head",
        kernel_initializer=keras.initializers.GlorotUniform(seed=3),
    )(x)
    return keras.Model(inputs, outputs, name="base")


def numpy_weights(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.weights]


def assert_unchanged(model, before):
    after = numpy_weights(model)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)


def has_pvera_layers(model):
    return any(isinstance(layer, PVeRADense) for _, layer in iter_layers(model))


X = np.random.default_rng(42).normal(size=(5, 8)).astype("float32")


@pytest.fixture
def trained(tmp_path):
    """An adapted model with trained vectors, saved to an adapter file."""
    model = randomize_vectors(keras_pvera.apply(make_base(), rank=4, seed=7), scale=1.0)
    path = tmp_path / "task.safetensors"
    keras_pvera.save_adapter(model, path)
    return model, path


def test_load_onto_base_model_reproduces_the_adapted_model(trained):
    model, path = trained
    expected = model.predict(X, verbose=0)
    base = make_base()
    base_predictions = base.predict(X, verbose=0)
    assert np.abs(expected - base_predictions).max() > 1e-3

    loaded = keras_pvera.load_adapter(base, path)

    assert isinstance(loaded, keras_pvera.PVeRAModel)
    assert loaded.pvera_config == model.pvera_config
    np.testing.assert_allclose(loaded.predict(X, verbose=0), expected, atol=1e-6)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.projection_registry.projection_a),
        keras.ops.convert_to_numpy(model.projection_registry.projection_a),
    )


def test_file_holds_only_what_pvera_adds(trained):
    model, path = trained
    tensors = safetensors.numpy.load_file(str(path))
    assert sorted(tensors) == [
        "pvera_A",
        "pvera_B",
        "pvera_lambda_b",
        "pvera_lambda_d",
    ]
    assert tensors["pvera_lambda_d"].shape == (2, 8)  # 2 layers, 2r
    assert tensors["pvera_lambda_b"].shape == (16 + 12,)
    np.testing.assert_array_equal(
        tensors["pvera_lambda_b"][16:],
        keras.ops.convert_to_numpy(model.adapted_layers["middle"].lambda_b),
    )


def test_load_onto_adapted_model_sets_the_vectors(trained):
    model, path = trained
    other = keras_pvera.apply(make_base(), rank=4, seed=7)
    assert (
        np.abs(other.predict(X, verbose=0) - model.predict(X, verbose=0)).max() > 1e-3
    )

    result = keras_pvera.load_adapter(other, path)

    assert result is other
    np.testing.assert_allclose(
        other.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-6
    )


@pytest.mark.slow
def test_without_projections_the_file_is_the_vectors_plus_16_kib(tmp_path):
    def bert(save_projection):
        base = tiny_bert(
            seed=None, hidden_dim=16, intermediate_dim=32, max_sequence_length=16
        )
        return randomize_vectors(
            keras_pvera.apply(
                base, rank=64, target="all", save_projection=save_projection
            ),
            scale=1.0,
        )

    model = bert(save_projection=False)
    path = tmp_path / "small.safetensors"
    keras_pvera.save_adapter(model, path)

    vector_bytes = sum(
        4 * (layer.lambda_d.shape[0] + layer.lambda_b.shape[0])
        for layer in model.adapted_layers.values()
    )
    assert len(model.adapted_layers) == 12
    assert os.path.getsize(path) <= vector_bytes + 16 * 1024
    assert "pvera_A" not in safetensors.numpy.load_file(str(path))

    with_projections = tmp_path / "big.safetensors"
    model = bert(save_projection=True)
    keras_pvera.save_adapter(model, with_projections)
    registry = model.projection_registry
    projection_bytes = 4 * (
        np.prod(registry.projection_a.shape) + np.prod(registry.projection_b.shape)
    )
    assert os.path.getsize(with_projections) >= vector_bytes + projection_bytes


def test_without_projections_they_are_regenerated_from_the_seed(tmp_path):
    model = randomize_vectors(
        keras_pvera.apply(make_base(), rank=4, seed=11, save_projection=False),
        scale=1.0,
    )
    path = tmp_path / "no_projection.safetensors"
    keras_pvera.save_adapter(model, path)

    loaded = keras_pvera.load_adapter(make_base(), path)

    assert loaded.pvera_config.save_projection is False
    np.testing.assert_allclose(
        loaded.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-6
    )


def test_layers_trained_in_full_travel_with_the_adapter(tmp_path):
    model = keras_pvera.apply(
        make_base(), rank=4, target=["hidden"], trainable_layers=["head"]
    )
    randomize_vectors(model, scale=1.0)
    head = model.base_model.get_layer("head")
    head.kernel.assign(np.full(head.kernel.shape, 0.5, "float32"))
    path = tmp_path / "with_head.safetensors"
    keras_pvera.save_adapter(model, path)

    loaded = keras_pvera.load_adapter(make_base(), path)

    assert loaded.trainable_paths == ["head"]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.base_model.get_layer("head").kernel),
        np.full(head.kernel.shape, 0.5, "float32"),
    )
    np.testing.assert_allclose(
        loaded.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-6
    )


# Mismatches: each raises naming the first one, and leaves the model as it was.


def test_a_renamed_layer_in_the_same_place_is_found_by_its_address(trained):
    model, path = trained
    loaded = keras_pvera.load_adapter(make_base(name="renamed"), path)
    assert list(loaded.adapted_layers) == ["renamed", "middle"]
    np.testing.assert_allclose(
        loaded.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-6
    )


def test_base_model_without_an_adapted_layer(trained):
    _, path = trained
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, name="renamed")(inputs)
    x = keras.layers.Dropout(0.1, name="extra")(x)  # `middle` moves.
    x = keras.layers.Dense(12, name="middle")(x)
    base = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    before = numpy_weights(base)
    with pytest.raises(ValueError, match="adapts layer 'hidden', which model"):
        keras_pvera.load_adapter(base, path)
    assert not has_pvera_layers(base)
    assert_unchanged(base, before)


def test_base_model_with_other_shapes(trained):
    _, path = trained
    base = make_base(hidden=20)
    before = numpy_weights(base)
    with pytest.raises(
        ValueError, match=r"'hidden' is 8 -> 16 in the adapter but 8 -> 20"
    ):
        keras_pvera.load_adapter(base, path)
    assert not has_pvera_layers(base)
    assert_unchanged(base, before)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rank": 8, "seed": 7}, "rank=4 differs from the model's rank=8"),
        ({"rank": 4, "seed": 8}, "seed=7 differs from the model's seed=8"),
        (
            {"rank": 4, "seed": 7, "alpha": 16.0},
            "alpha=1.0 differs from the model's alpha=16.0",
        ),
    ],
)
def test_adapted_model_with_other_settings(trained, settings, message):
    _, path = trained
    model = keras_pvera.apply(make_base(), **settings)
    before = numpy_weights(model)
    with pytest.raises(ValueError, match=message):
        keras_pvera.load_adapter(model, path)
    assert_unchanged(model, before)


def test_adapted_model_with_other_layer_set(trained):
    _, path = trained
    model = keras_pvera.apply(make_base(), rank=4, seed=7, target=["hidden"])
    before = numpy_weights(model)
    with pytest.raises(ValueError, match="adapted layer 'middle', which is not"):
        keras_pvera.load_adapter(model, path)
    assert_unchanged(model, before)

    wider = keras_pvera.apply(
        make_base(), rank=4, seed=7, target=["hidden", "middle", "head"]
    )
    with pytest.raises(ValueError, match="model has adapted layer 'head'"):
        keras_pvera.load_adapter(wider, path)


def rewrite(path, drop=None, metadata_update=None, replace=None):
    """Rewrites an adapter file with a tensor dropped or metadata changed."""
    with safetensors.safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if drop:
        del tensors[drop]
    if replace:
        tensors.update(replace)
    if metadata_update:
        header = json.loads(metadata["keras_pvera"])
        metadata_update(header)
        metadata["keras_pvera"] = json.dumps(header)
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("name", ["pvera_lambda_b", "pvera_lambda_d", "pvera_A"])
def test_missing_tensor(trained, name):
    _, path = trained
    rewrite(path, drop=name)
    base = make_base()
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        keras_pvera.load_adapter(base, path)
    assert not has_pvera_layers(base)


def test_tensor_of_the_wrong_shape(trained):
    _, path = trained
    rewrite(path, replace={"pvera_lambda_b": np.zeros(5, "float32")})
    with pytest.raises(ValueError, match=r"'pvera_lambda_b' has shape \(5,\)"):
        keras_pvera.load_adapter(make_base(), path)


def test_newer_format_version(trained):
    _, path = trained
    rewrite(path, metadata_update=lambda h: h.update(format_version=99))
    with pytest.raises(ValueError, match="format_version=99"):
        keras_pvera.load_adapter(make_base(), path)


def test_truncated_file(trained):
    _, path = trained
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    base = make_base()
    before = numpy_weights(base)
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        keras_pvera.load_adapter(base, path)
    assert not has_pvera_layers(base)
    assert_unchanged(base, before)


def test_foreign_files(tmp_path):
    other = tmp_path / "other.safetensors"
    safetensors.numpy.save_file({"weight": np.ones(3, "float32")}, str(other))
    with pytest.raises(ValueError, match="not a keras_pvera adapter file"):
        keras_pvera.load_adapter(make_base(), other)

    peft_like = tmp_path / "adapter_model.safetensors"
    safetensors.numpy.save_file(
        {"base_model.model.q.pvera_lambda_d": np.ones(4, "float32")},
        str(peft_like),
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="load_peft_adapter"):
        keras_pvera.load_adapter(make_base(), peft_like)

    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors at all")
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        keras_pvera.load_adapter(make_base(), text)

    with pytest.raises(FileNotFoundError):
        keras_pvera.load_adapter(make_base(), tmp_path / "absent.safetensors")


def test_a_keras_file_given_as_an_adapter_file_is_named_as_such(trained):
    model, adapter_path = trained
    path = adapter_path.parent / "whole.keras"
    model.save(path)
    with pytest.raises(ValueError, match=r"saved as `\.keras`.*load_model"):
        keras_pvera.load_adapter(make_base(), path)


def test_model_holding_pvera_layers_but_not_the_pvera_model(trained):
    _, path = trained
    model = keras_pvera.apply(make_base(), rank=4, seed=7)
    with pytest.raises(ValueError, match="Pass the model that keras_pvera.apply"):
        keras_pvera.load_adapter(model.base_model, path)


def test_projections_must_match_when_the_file_has_none(tmp_path):
    model = randomize_vectors(
        keras_pvera.apply(make_base(), rank=4, seed=7, save_projection=False), scale=1.0
    )
    path = tmp_path / "no_projection.safetensors"
    keras_pvera.save_adapter(model, path)
    target = keras_pvera.apply(make_base(), rank=4, seed=7)
    registry = target.projection_registry
    registry.projection_a.assign(np.ones(registry.projection_a.shape, "float32"))
    before = numpy_weights(target)
    with pytest.raises(ValueError, match="holds no projections"):
        keras_pvera.load_adapter(target, path)
    assert_unchanged(target, before)


def test_saving_without_projections_that_the_seed_does_not_make(tmp_path):
    model = keras_pvera.apply(make_base(), rank=4, save_projection=False)
    registry = model.projection_registry
    registry.projection_b.assign(np.ones(registry.projection_b.shape, "float32"))
    path = tmp_path / "a.safetensors"
    with pytest.raises(ValueError, match="save_projection=True"):
        keras_pvera.save_adapter(model, path)
    assert not path.exists()


def test_save_needs_an_adapted_model(tmp_path):
    with pytest.raises(TypeError, match="PVeRAModel"):
        keras_pvera.save_adapter(make_base(), tmp_path / "a.safetensors")


# Atomic writes.


def test_interrupted_save_leaves_the_previous_file(trained, monkeypatch):
    model, path = trained
    previous = path.read_bytes()
    randomize_vectors(model, seed=1, scale=1.0)

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        keras_pvera.save_adapter(model, path)

    assert path.read_bytes() == previous
    assert sorted(os.listdir(path.parent)) == [path.name]
    new_path = path.parent / "new.safetensors"
    with pytest.raises(OSError, match="disk full"):
        keras_pvera.save_adapter(model, new_path)
    assert not new_path.exists()
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_save_replaces_an_existing_file(trained):
    model, path = trained
    randomize_vectors(model, seed=1, scale=1.0)
    keras_pvera.save_adapter(model, path)
    tensors = safetensors.numpy.load_file(str(path))
    np.testing.assert_array_equal(
        tensors["pvera_lambda_d"][0],
        keras.ops.convert_to_numpy(model.adapted_layers["hidden"].lambda_d),
    )


def test_saved_file_gets_the_usual_permissions(trained, tmp_path):
    _, path = trained
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert os.stat(path).st_mode & 0o777 == os.stat(reference).st_mode & 0o777


@needs_keras_3_15
@pytest.mark.parametrize("version", SAVED_FILE_SETS)
def test_an_adapter_file_written_by_an_earlier_version_still_loads(version):
    # tests/data/make_saved_files.py wrote it with that version.
    expected = np.load(saved_file(version, "expected.npz"))
    # The same base weights on every backend: those of the .keras file.
    base = keras.saving.load_model(saved_file(version, "model.keras")).unload()
    model = keras_pvera.load_adapter(base, saved_file(version, "adapter.safetensors"))
    assert list(model.adapted_layers) == ["hidden", "middle"]
    assert model.pvera_config.alpha == 2.0
    np.testing.assert_allclose(
        model.predict(expected["x"], verbose=0), expected["y"], atol=1e-6
    )


def trained_with_head(values, target=None, trainable_layers=("head",), **settings):
    """An adapted model training `head` in full; `values` seeds its values."""
    settings = {"rank": 4, "seed": 7, **settings}
    model = keras_pvera.apply(
        make_base(),
        target=target,
        trainable_layers=list(trainable_layers) or None,
        **settings,
    )
    randomize_vectors(model, seed=values, scale=1.0)
    for path in trainable_layers:
        kernel = model.base_model.get_layer(path).kernel
        rng = np.random.default_rng(values)
        kernel.assign(rng.normal(size=kernel.shape).astype("float32"))
    return model


@pytest.fixture
def served(tmp_path):
    """A compiled adapted model that has predicted once, and a second file."""
    model = trained_with_head(values=0)
    model.compile(loss="mse")
    model.predict(X, verbose=0)
    path = tmp_path / "other.safetensors"
    keras_pvera.save_adapter(trained_with_head(values=1), path)
    return model, path


def test_hotswap_reuses_the_compiled_predict_without_tracing_again(served, monkeypatch):
    model, path = served
    before = model.predict(X, verbose=0)
    compiled = model.predict_function
    calls = []
    traced_call = PVeRADense.call

    def counted(layer, *args, **kwargs):
        calls.append(layer.name)  # On JAX and TensorFlow: only while tracing.
        return traced_call(layer, *args, **kwargs)

    monkeypatch.setattr(PVeRADense, "call", counted)
    model.predict(X, verbose=0)
    calls_without_swap = len(calls)

    keras_pvera.hotswap_adapter(model, path)
    after = model.predict(X, verbose=0)

    assert model.predict_function is compiled
    # Torch runs eagerly (one call per adapted layer); JAX and TensorFlow
    # run the compiled step without tracing it again (no call).
    assert len(calls) - calls_without_swap == calls_without_swap
    if keras.backend.backend() in ("jax", "tensorflow"):
        assert calls == []
    fresh = keras_pvera.load_adapter(make_base(), path)
    np.testing.assert_allclose(after, fresh.predict(X, verbose=0), atol=1e-6)
    assert np.abs(after - before).max() > 1e-3
    # The head trained in full is the file's too.
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.base_model.get_layer("head").kernel),
        keras.ops.convert_to_numpy(fresh.base_model.get_layer("head").kernel),
    )


def other_file(tmp_path, change):
    """An adapter file that differs from `served`'s adapter by `change`."""
    changes = {
        "rank": {"rank": 8},
        "seed": {"seed": 8},
        "alpha": {"alpha": 16.0},
        "targets": {"target": ["hidden"]},
        "trained in full": {"trainable_layers": ()},
        "projections": {},
    }
    model = trained_with_head(values=2, **changes[change])
    if change == "projections":
        a = model.projection_registry.projection_a
        a.assign(np.ones(a.shape, "float32"))
    path = tmp_path / "other.safetensors"
    keras_pvera.save_adapter(model, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ("rank", "rank=8 differs from the model's rank=4"),
        ("seed", "seed=8 differs from the model's seed=7"),
        ("alpha", "alpha=16.0 differs from the model's alpha=1.0"),
        ("targets", "model has adapted layer 'middle', which the adapter lacks"),
        ("trained in full", "model has layer trained in full 'head', which the"),
        ("projections", "projections differ from the model's"),
    ],
)
def test_hotswap_refuses_a_file_that_differs_and_assigns_nothing(
    served, tmp_path, change, message
):
    model, _ = served
    before = numpy_weights(model)
    compiled = model.predict_function
    with pytest.raises(ValueError, match=message):
        keras_pvera.hotswap_adapter(model, other_file(tmp_path, change))
    assert_unchanged(model, before)
    assert model.predict_function is compiled


def test_hotswap_into_an_adapter_not_loaded_names_the_loaded_ones(served):
    model, path = served
    with pytest.raises(ValueError, match=r"no adapter named 'other'.*\['default'\]"):
        keras_pvera.hotswap_adapter(model, path, adapter_name="other")
    with pytest.raises(TypeError, match="Expected a PVeRAModel"):
        keras_pvera.hotswap_adapter(make_base(), path)


def test_hotswap_into_a_merged_adapter_is_refused(served):
    model, path = served
    model.merge_adapter()
    before = numpy_weights(model)
    with pytest.raises(ValueError, match="merged into the base kernels.*unmerge"):
        keras_pvera.hotswap_adapter(model, path)
    assert_unchanged(model, before)
