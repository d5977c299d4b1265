"""Training an adapted model across devices with `keras.distribution` (JAX).

A subprocess with `KERAS_BACKEND=jax` and
`XLA_FLAGS=--xla_force_host_platform_device_count=8` sees 8 CPU devices and:

- trains with `DataParallel` across all 8, and on one device, from the same
  start with the same noise: JAX's partitionable threefry (its default) draws
  the same numbers for a sharded array as for the whole one, so sampling stays
  on and the lambdas must agree to float tolerance;
- trains with `ModelParallel` whose `LayoutMap` shards the frozen base
  kernels over a "model" axis, while the PVeRA vectors and the shared
  projections stay replicated.

Run by hand, this module is the worker:
`XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax
python tests/test_distribution.py`.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 4
BATCH = 32


def make_base():
    """The same weights every time: NumPy-drawn, not backend-seeded."""
    import keras

    inputs = keras.Input((16,))
    x = keras.layers.Dense(64, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(32, activation="relu", name="middle")(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(5)
    model.set_weights(
        [rng.normal(scale=0.3, size=w.shape).astype("float32") for w in model.weights]
    )
    return model


def train(distribution=None):
    """Adapts and trains for STEPS steps, under `distribution` if given.

    Returns the model (its variables still laid out as trained).
    """
    import contextlib

    import keras

    import keras_pvera

    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 16)).astype("float32")
    y = rng.integers(0, 4, size=(STEPS * BATCH,))
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        keras.utils.set_random_seed(0)
        model = keras_pvera.apply(make_base(), rank=8, target=["hidden", "middle"])
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model


def lambdas(model):
    import keras

    return {
        v.path: keras.ops.convert_to_numpy(v)
        for v in model.trainable_weights
        if "pvera_lambda" in v.path
    }


def max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def sharding_of(variable):
    """The mesh axes each dimension of a variable's value is split over."""
    return [
        list(axes) if isinstance(axes, tuple) else axes
        for axes in variable.value.sharding.spec
    ] + [None] * (len(variable.shape) - len(variable.value.sharding.spec))


def work():
    import jax
    import keras

    report = {
        "devices": len(keras.distribution.list_devices()),
        "partitionable_threefry": bool(jax.config.jax_threefry_partitionable),
    }
    single = lambdas(train())
    start = lambdas(train_zero_steps())
    report["moved"] = max_diff(single, start)

    data_parallel = train(keras.distribution.DataParallel())
    report["data_parallel_diff"] = max_diff(lambdas(data_parallel), single)
    report["data_parallel_lambda_devices"] = len(
        data_parallel.trainable_weights[0].value.sharding.device_set
    )

    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[r"(hidden|middle)/kernel"] = (None, "model")
    model_parallel = train(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    report["model_parallel_diff"] = max_diff(lambdas(model_parallel), single)
    report["sharding"] = {
        v.path: sharding_of(v)
        for v in model_parallel.weights
        if v.path.endswith("kernel") or "pvera" in v.path
    }
    print("REPORT " + json.dumps(report))


def train_zero_steps():
    """The adapted model before training, for how far training moved it."""
    import keras

    import keras_pvera

    keras.utils.set_random_seed(0)
    return keras_pvera.apply(make_base(), rank=8, target=["hidden", "middle"])


@pytest.mark.slow
def test_data_and_model_parallel_training_on_8_jax_devices():
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip(
            "runs in the jax run only: it starts its own JAX process with 8 "
            "host devices"
        )
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    result = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(s for s in result.stdout.splitlines() if s.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    assert report["devices"] == 8
    assert report["partitionable_threefry"]
    # Training moved the lambdas far more than the tolerance below.
    assert report["moved"] > 1e-2
    # Same noise, same data: only the order of the gradient sums differs.
    assert report["data_parallel_diff"] <= 1e-5, report
    assert report["data_parallel_lambda_devices"] == 8
    assert report["model_parallel_diff"] <= 1e-5, report
    sharding = report["sharding"]
    for name in ("hidden", "middle"):
        assert sharding[f"{name}/kernel"] == [None, "model"], sharding
        for vector in ("pvera_lambda_d", "pvera_lambda_b"):
            assert sharding[f"{name}/{vector}"] == [None], sharding
    assert sharding["head/kernel"] == [None, None], sharding
    for matrix in ("pvera_A", "pvera_B"):
        found = [v for k, v in sharding.items() if k.endswith(matrix)]
        assert found == [[None, None]], sharding


if __name__ == "__main__":
    work()
