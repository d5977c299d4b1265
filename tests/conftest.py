"""Test set-up: one Keras backend per run, chosen with KERAS_BACKEND."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Under pytest-xdist (`-n 2`, as README's test command runs), each worker
# computes on one thread: two workers with two threads each would share two
# cores four ways.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_keras():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


# Breadth runs in full in the torch run (the default backend). The JAX and
# TensorFlow runs check every behaviour on the core tests, and the
# architecture matrices (tests/hub/test_keras_hub_architectures.py,
# tests/peft/test_peft_architectures.py) on one architecture of each kind:
# a WordPiece encoder, byte-pair and SentencePiece decoders, an
# encoder-decoder and an image model. KERAS_PVERA_FULL_MATRIX=1 runs every
# architecture on every backend.
ARCHITECTURES_ON_EVERY_BACKEND = {"bert", "gpt2", "gemma", "bart", "vit"}


def _runs_here(item):
    if keras.backend.backend() == "torch":
        return True
    if os.environ.get("KERAS_PVERA_FULL_MATRIX") == "1":
        return True
    if item.get_closest_marker("default_backend_only"):
        return False
    if item.get_closest_marker("architecture_matrix"):
        callspec = getattr(item, "callspec", None)
        return callspec is None or callspec.id in ARCHITECTURES_ON_EVERY_BACKEND
    return True


def pytest_collection_modifyitems(config, items):
    deselected = [item for item in items if not _runs_here(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if _runs_here(item)]


def numpy_pvera(x, kernel, bias, a, b, lambda_d, lambda_b, alpha, eps=None):
    """PVeRA's formula (keras_pvera/src/layers/pvera_dense.py) in NumPy, for
    a Dense map.

    `x` is (..., in), `kernel` is (in, out); `eps` (..., r) turns sampling on.
    Returns the pre-activation output and `(mu, logvar)`.
    """
    in_dim, out_dim = kernel.shape
    r = a.shape[0] // 2
    h = lambda_d * (x @ a[:, :in_dim].T)
    mu, logvar = h[..., :r], h[..., r:]
    z = mu if eps is None else mu + eps * np.exp(0.5 * logvar)
    y = x @ kernel + (0.0 if bias is None else bias)
    y = y + alpha * lambda_b * (z @ b[:out_dim, :].T)
    return y, (mu, logvar)


def keras_version():
    return tuple(int(part) for part in keras.version().split(".")[:2])


# Saved files written by earlier keras_pvera versions (tests/data, made by
# tests/data/make_saved_files.py): each must still load and predict the same.
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SAVED_FILE_SETS = ["v0_1_0", "main_2026_11_29"]


def saved_file(prefix, kind):
    """The path of one of tests/data's saved files (`model.keras`...)."""
    return os.path.join(DATA_DIR, f"{prefix}_{kind}")


# tests/data's files were written with Keras 3.15, whose layer configs
# (Dense's `quantization_config`) older Keras cannot read, keras_pvera or not.
needs_keras_3_15 = pytest.mark.skipif(
    keras_version() < (3, 15),
    reason="tests/data's files were written by Keras 3.15; older Keras cannot "
    "read its Dense configs",
)
