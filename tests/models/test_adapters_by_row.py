"""Several adapters in one batch: `predict(x, adapter_names=[...])` and
`predict_with_uncertainty(..., adapter_names=[...])`, one name per example."""

import keras
import numpy as np
import pytest

import keras_pvera

NAMES = ["default", "other", "__base__", "other", "default", "__base__", "other"]


def two_adapter_model(seed):
    """ "default" adapts both layers, "other" only the hidden one; both
    with vectors as after training."""
    keras.utils.set_random_seed(seed)
    base = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    model = keras_pvera.apply(base, rank=4, target=["hidden", "head"], seed=seed)
    model.add_adapter("other", rank=4, seed=seed, alpha=2.0, target=["hidden"])
    rng = np.random.default_rng(seed)
    for layer in model.adapter_registry.wrappers.values():
        for vectors in layer.adapter_vectors.values():
            vectors.lambda_d.assign(rng.normal(0.0, 0.7, vectors.lambda_d.shape))
            vectors.lambda_b.assign(rng.normal(0.0, 0.7, vectors.lambda_b.shape))
    x = rng.normal(size=(len(NAMES), 6)).astype("float32")
    return model, x


def each_alone(model, predict):
    """`{name: predict()}` with each adapter alone active, and the base."""
    outputs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outputs[name] = predict()
    model.set_adapter("default")
    with model.disable_adapter():
        outputs["__base__"] = predict()
    return outputs


def rows_of(outputs, axis=0, names=NAMES):
    """Each example's row from the output of its adapter in `names`."""
    return np.stack(
        [np.take(outputs[name], i, axis=axis) for i, name in enumerate(names)],
        axis=axis,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predict_gives_each_example_its_adapters_output(seed):
    model, x = two_adapter_model(seed)
    mixed = model.predict(x, adapter_names=NAMES, batch_size=3, verbose=0)
    alone = each_alone(model, lambda: model.predict(x, verbose=0))
    np.testing.assert_allclose(mixed, rows_of(alone), rtol=1e-5, atol=1e-5)
    # The adapters differ, so picking the wrong one would show.
    assert np.abs(alone["default"] - alone["other"]).min() > 1e-4
    # Afterwards the active adapter runs for every example again.
    np.testing.assert_allclose(
        model.predict(x, verbose=0), alone["default"], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monte_carlo_samples_are_those_of_each_adapter_alone(seed):
    model, x = two_adapter_model(seed)
    settings = dict(n=5, seed=seed, batch_size=10, return_samples=True, verbose=0)
    mixed = keras_pvera.predict_with_uncertainty(
        model, x, adapter_names=NAMES, **settings
    )
    alone = each_alone(
        model,
        lambda: keras_pvera.predict_with_uncertainty(model, x, **settings).samples,
    )
    np.testing.assert_allclose(
        mixed.samples, rows_of(alone, axis=1), rtol=1e-5, atol=1e-5
    )
    base_rows = np.array(NAMES) == "__base__"
    assert mixed.std[~base_rows].min() > 1e-4
    assert mixed.std[base_rows].max() < 1e-5
    # The layers' sampling switches are as they were.
    assert not model.sample_at_inference
    for layer in model.adapter_registry.wrappers.values():
        assert not any(layer.sampling_flags().values())


def test_a_batch_of_base_model_rows_only_has_no_spread():
    model, x = two_adapter_model(0)
    names = ["__base__"] * len(x)
    with pytest.warns(UserWarning, match="spread"):
        result = keras_pvera.predict_with_uncertainty(
            model, x, n=3, seed=0, adapter_names=names, verbose=0
        )
    with model.disable_adapter():
        base = model.predict(x, verbose=0)
    np.testing.assert_allclose(result.mean, base, rtol=1e-6, atol=1e-6)
    assert result.std.max() < 1e-6  # Float rounding of equal passes.


def test_names_that_do_not_fit_are_refused():
    model, x = two_adapter_model(0)
    with pytest.raises(ValueError, match="'missing'. Loaded adapters"):
        model.predict(x, adapter_names=NAMES[:-1] + ["missing"], verbose=0)
    with pytest.raises(ValueError, match="7 examples, 2 names"):
        model.predict(x, adapter_names=["default", "other"], verbose=0)
    with pytest.raises(ValueError, match="7 examples, 2 names"):
        keras_pvera.predict_with_uncertainty(
            model, x, n=2, adapter_names=["default", "other"], verbose=0
        )
    with pytest.raises(ValueError, match="needs inputs as arrays"):
        model.predict(iter([x]), adapter_names=NAMES, verbose=0)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.predict(x, adapter_names=NAMES, verbose=0)


def test_adapter_names_need_a_model_made_by_apply():
    model, x = two_adapter_model(0)
    plain = keras.Sequential([model.base_model])
    with pytest.raises(ValueError, match="made by `keras_pvera.apply`"):
        keras_pvera.predict_with_uncertainty(
            plain, x, n=2, adapter_names=NAMES, verbose=0
        )


def test_sampled_layers_are_among_the_batch_adapters_layers():
    model, x = two_adapter_model(0)
    settings = dict(n=4, seed=0, adapter_names=["other"] * len(NAMES), verbose=0)
    # "other" adapts only the hidden layer.
    with pytest.raises(ValueError, match="'head'"):
        keras_pvera.predict_with_uncertainty(
            model, x, sampled_layers=["head"], **settings
        )
    result = keras_pvera.predict_with_uncertainty(
        model, x, sampled_layers=["hidden"], **settings
    )
    assert result.std.min() > 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_example_runs_its_adapters_own_copy_of_a_trained_head(seed):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ]
    )
    # "default" trains its own copy of the head, "other" runs the original.
    model = keras_pvera.apply(base, rank=4, trainable_layers=["head"], seed=seed)
    model.add_adapter("other", rank=4, seed=seed)
    rng = np.random.default_rng(seed)
    head_copy = model.adapter_registry.trained_in_full("default")["head"]
    head_copy.kernel.assign(rng.normal(size=head_copy.kernel.shape))
    for layer in model.adapter_registry.wrappers.values():
        for vectors in layer.adapter_vectors.values():
            vectors.lambda_b.assign(rng.normal(0.0, 0.7, vectors.lambda_b.shape))
    x = rng.normal(size=(len(NAMES), 6)).astype("float32")
    mixed = model.predict(x, adapter_names=NAMES, verbose=0)
    alone = each_alone(model, lambda: model.predict(x, verbose=0))
    np.testing.assert_allclose(mixed, rows_of(alone), rtol=1e-5, atol=1e-6)
    assert np.abs(alone["default"] - alone["other"]).max() > 1e-3


def test_one_compiled_predict_function_serves_every_call():
    """Calls naming other adapters, and plain calls between them, reuse the
    model's predict function (JAX and TensorFlow trace it once for packed
    inputs, once for plain ones), each row still getting its adapter's
    output; an adapter added afterwards is picked."""
    model, x = two_adapter_model(0)
    alone = each_alone(model, lambda: model.predict(x, verbose=0))
    mixed = model.predict(x, adapter_names=NAMES, verbose=0)
    function = model.predict_function
    assert function is not None
    plain = model.predict(x, verbose=0)
    turned = {"default": "other", "other": "__base__", "__base__": "default"}
    others = [turned[name] for name in NAMES]
    mixed_others = model.predict(x, adapter_names=others, verbose=0)
    only_other = model.predict(x, adapter_names=["other"] * len(NAMES), verbose=0)
    assert model.predict_function is function
    np.testing.assert_allclose(mixed, rows_of(alone), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain, alone["default"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        mixed_others, rows_of(alone, names=others), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(only_other, alone["other"], rtol=1e-5, atol=1e-5)
    # A new adapter (any change of adapters) drops the compiled function.
    model.add_adapter("new", rank=4, seed=0, target=["hidden", "head"])
    for layer in model.adapter_registry.wrappers.values():
        vectors = layer.adapter_vectors["new"]
        vectors.lambda_b.assign(np.full(vectors.lambda_b.shape, 0.5, "float32"))
    with_new = ["new", *NAMES[1:]]
    mixed_new = model.predict(x, adapter_names=with_new, verbose=0)
    model.set_adapter("new")
    alone["new"] = model.predict(x, verbose=0)
    assert np.abs(alone["new"] - alone["default"]).min() > 1e-4
    np.testing.assert_allclose(
        mixed_new, rows_of(alone, names=with_new), rtol=1e-5, atol=1e-5
    )


def test_a_calls_work_grows_with_neither_its_adapters_nor_its_batches(monkeypatch):
    """A model running eagerly (torch; here every backend) stacks its
    adapters' vectors once per call, in one op a table: how many adapters
    a call names, and in how many batches it runs, changes no count of the
    ops the adapted layers make. (A compiled one stacks them in its trace,
    made once for every call.)"""
    model, x = two_adapter_model(0)
    model.run_eagerly = True
    for name in ("a2", "a3", "a4", "a5"):
        model.add_adapter(name, rank=4, seed=0, target=["hidden", "head"])
    counts = {"stack": 0, "multiply": 0, "cast": 0}
    for op_name in counts:
        op = getattr(keras.ops, op_name)

        def counted(*args, op=op, op_name=op_name, **kwargs):
            counts[op_name] += 1
            return op(*args, **kwargs)

        monkeypatch.setattr(keras.ops, op_name, counted)

    def work(names, batch_size):
        for op_name in counts:
            counts[op_name] = 0
        model.predict(x, adapter_names=names, batch_size=batch_size, verbose=0)
        return dict(counts)

    two = ["default", "other"] * 3 + ["__base__"]
    six = ["default", "other", "a2", "a3", "a4", "a5", "__base__"]
    one_batch = work(six, 7)
    assert one_batch["stack"] > 0
    assert work(two, 7) == one_batch
    # 7 batches of one row: the vectors are still stacked once.
    assert work(six, 1)["stack"] == one_batch["stack"]
