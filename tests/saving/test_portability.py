"""Files written under one backend load under every other backend.

One process per backend adapts the same base model, trains it a little with
its own backend, and writes a `.keras` file and an adapter file
(`keras_pvera.save_adapter`), both without projections (they are regenerated
from the seed), beside its mean predictions. Then one process per backend
reads every file: the mean predictions must match the writer's, and the
projections regenerated from the seed must be bit-identical everywhere.

Run by hand, this module is the worker:
`KERAS_BACKEND=jax python tests/test_portability.py write DIR`.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

BACKENDS = ("torch", "jax", "tensorflow")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def make_base():
    """The same small model, with the same weights, under every backend.

    The weights come from NumPy: Keras' seeded initializers draw different
    numbers on different backends.
    """
    import keras

    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    x = keras.layers.EinsumDense("abc,cde->abde", (6, 2, 5), name="heads")(x)
    x = keras.layers.Reshape((6, 10))(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(7)
    model.set_weights(
        [rng.normal(scale=0.3, size=w.shape).astype("float32") for w in model.weights]
    )
    return model


def inputs():
    return np.random.default_rng(11).normal(size=(5, 6, 8)).astype("float32")


def projection_digest(model):
    """SHA-256 of the bytes of the model's `A` and `B`, as float32."""
    import keras

    registry = model.projection_registry
    digest = hashlib.sha256()
    for matrix in (registry.projection_a, registry.projection_b):
        array = keras.ops.convert_to_numpy(matrix)
        assert array.dtype == np.float32
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write(directory):
    """Adapts, trains a little and saves, under the current backend."""
    import keras

    import keras_pvera

    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    model = keras_pvera.apply(
        make_base(), rank=4, target=["hidden", "heads"], seed=3, save_projection=False
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x = inputs()
    model.fit(x, np.ones((5, 3), "float32"), epochs=3, verbose=0)
    model.save(directory / f"{backend}.keras")
    keras_pvera.save_adapter(model, directory / f"{backend}.safetensors")
    np.save(directory / f"{backend}.npy", model.predict(x, verbose=0))
    (directory / f"{backend}.json").write_text(
        json.dumps({"projections": projection_digest(model)})
    )


def read(directory):
    """Loads every backend's files under the current backend; prints a report."""
    import keras

    import keras_pvera

    x = inputs()
    seed_a, seed_b = None, None
    report = {"backend": keras.backend.backend(), "files": {}}
    for writer in BACKENDS:
        expected = np.load(directory / f"{writer}.npy")
        whole = keras.models.load_model(directory / f"{writer}.keras")
        adapter = keras_pvera.load_adapter(
            make_base(), directory / f"{writer}.safetensors"
        )
        if seed_a is None:
            registry = whole.projection_registry
            seed_a, seed_b = keras_pvera.generate_projections(
                3, 4, registry.in_max, registry.out_max
            )
        report["files"][writer] = {
            "keras_max_abs_diff": float(
                np.max(np.abs(whole.predict(x, verbose=0) - expected))
            ),
            "adapter_max_abs_diff": float(
                np.max(np.abs(adapter.predict(x, verbose=0) - expected))
            ),
            "keras_projections": projection_digest(whole),
            "adapter_projections": projection_digest(adapter),
            "written_projections": json.loads(
                (directory / f"{writer}.json").read_text()
            )["projections"],
        }
    digest = hashlib.sha256(seed_a.tobytes() + seed_b.tobytes()).hexdigest()
    report["numpy_projections"] = digest
    print("REPORT " + json.dumps(report))


def write_compiled(directory):
    """Saves an adapted model compiled with an optimizer that has stepped."""
    import keras

    import keras_pvera

    model = keras_pvera.apply(make_base(), rank=4, target=["hidden"], seed=3)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(inputs(), np.ones((5, 3), "float32"), epochs=1, verbose=0)
    model.save(directory / "compiled.keras")


def fit_loaded(directory):
    """Loads `compiled.keras` without its optimizer, compiles, fits a step."""
    import keras

    import keras_pvera  # noqa: F401 (registers the classes for loading)

    model = keras.saving.load_model(directory / "compiled.keras", compile=False)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    before = keras.ops.convert_to_numpy(model.adapted_layers["hidden"].lambda_b)
    model.fit(inputs(), np.ones((5, 3), "float32"), epochs=1, verbose=0)
    after = keras.ops.convert_to_numpy(model.adapted_layers["hidden"].lambda_b)
    print("REPORT " + json.dumps({"changed": bool(np.any(before != after))}))


def run_worker(backend, command, directory):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    result = subprocess.run(
        [sys.executable, __file__, command, str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{command} under {backend} failed:\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


# It starts a process per backend itself, so the torch run is enough.
@pytest.mark.slow
@pytest.mark.default_backend_only
def test_files_written_under_each_backend_load_under_every_backend(tmp_path):
    import keras

    if keras.backend.backend() != "torch":
        pytest.skip(
            "runs in the torch run only: it starts a writer and a reader "
            "process for every backend itself"
        )
    for backend in BACKENDS:
        run_worker(backend, "write", tmp_path)
    for reader in BACKENDS:
        stdout = run_worker(reader, "read", tmp_path)
        line = next(s for s in stdout.splitlines() if s.startswith("REPORT "))
        report = json.loads(line[len("REPORT ") :])
        assert report["backend"] == reader
        for writer, found in report["files"].items():
            where = f"written under {writer}, read under {reader}"
            assert found["keras_max_abs_diff"] <= 1e-5, (where, found)
            assert found["adapter_max_abs_diff"] <= 1e-5, (where, found)
            # Saved without projections: every process regenerated them
            # from the seed, bit for bit NumPy's.
            for key in ("keras_projections", "adapter_projections"):
                assert found[key] == report["numpy_projections"], (where, key)
            assert found["written_projections"] == report["numpy_projections"]


@pytest.mark.slow
def test_a_compiled_model_saved_on_torch_trains_on_tensorflow_compiled_anew(tmp_path):
    """The saved optimizer is the writer backend's (TensorFlow fails to load
    torch's, as it does for a plain Keras model): load with `compile=False`,
    then compile and train."""
    import keras

    if keras.backend.backend() != "torch":
        pytest.skip(
            "runs in the torch run only: it writes under torch and starts a "
            "TensorFlow process itself"
        )
    write_compiled(tmp_path)
    stdout = run_worker("tensorflow", "fit_loaded", tmp_path)
    line = next(s for s in stdout.splitlines() if s.startswith("REPORT "))
    assert json.loads(line[len("REPORT ") :]) == {"changed": True}


if __name__ == "__main__":
    commands = {"write": write, "read": read, "fit_loaded": fit_loaded}
    commands[sys.argv[1]](pathlib.Path(sys.argv[2]))
