"""save_lora_weights: an adapter's mean as KerasHub's own `.lora.h5` file.

KerasHub's `backbone.load_lora_weights(path)` on a fresh build of the same
model (the builders of test_keras_hub_architectures.py give the same weights
every call) must give the adapted model's mean outputs.
"""

import warnings

import keras
import numpy as np
import pytest
from test_keras_hub_architectures import CASES
from test_keras_hub_architectures import TEXTS
from test_keras_hub_architectures import bert
from test_keras_hub_architectures import gpt2
from test_keras_hub_architectures import numpy_outputs
from test_keras_hub_architectures import randomize

import keras_pvera

keras_hub = pytest.importorskip("keras_hub")

TOLERANCE = 1e-4


def adapted(task, **settings):
    """The default targets (KerasHub's LoRA layers), head left as it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*chosen layers are not built")
        model = keras_pvera.apply(task, rank=4, trainable_layers=[], **settings)
    return randomize(model, scale=0.5)


def backbone_of(model):
    return getattr(model, "backbone", model)


def max_difference(first, second):
    first, second = numpy_outputs(first), numpy_outputs(second)
    assert first.keys() == second.keys()
    return max(float(np.abs(first[k] - second[k]).max()) for k in first)


def assert_loads_the_mean(before, actual, expected):
    """`actual` (KerasHub with the LoRA file) is `expected` (the adapted
    mean), far closer than the adapter moves `before` (the base model). The
    tiny classifiers' logits are small (about 1e-2), and the adapter moves
    them by about 1e-4: the error must be far below that too."""
    moved = max_difference(before, expected)
    assert moved > 1e-5
    difference = max_difference(actual, expected)
    assert difference <= min(TOLERANCE, 1e-3 * moved)
    return difference


@pytest.mark.slow  # three tasks with their preprocessors: about 3 s
def test_a_bert_classifier_on_raw_text(tmp_path):
    model = adapted(bert(preprocessor=True))
    expected = model.predict(TEXTS, verbose=0)
    path = str(tmp_path / "adapter.lora.h5")
    keras_pvera.save_lora_weights(model, path)

    before = bert(preprocessor=True).predict(TEXTS, verbose=0)
    # A fresh build, as a server would load it: KerasHub enables LoRA
    # itself. (Its `predict` must not have run before: on TensorFlow a
    # traced predict function would keep computing without LoRA.)
    fresh = bert(preprocessor=True)
    fresh.backbone.load_lora_weights(path)
    assert_loads_the_mean(before, fresh.predict(TEXTS, verbose=0), expected)
    # Per-head query/value kernels (16, 2, 8): rank 8, the head size.
    assert fresh.backbone._lora_rank == 8


def test_sampling_at_inference_writes_the_mean(tmp_path):
    model = adapted(bert())
    x = {
        "token_ids": np.ones((2, 8), "int32"),
        "segment_ids": np.zeros((2, 8), "int32"),
        "padding_mask": np.ones((2, 8), bool),
    }
    expected = model.predict(x, verbose=0)
    model.sample_at_inference = True
    keras_pvera.save_lora_weights(model, tmp_path / "adapter.lora.h5")
    fresh = bert()
    fresh.backbone.load_lora_weights(str(tmp_path / "adapter.lora.h5"))
    assert max_difference(fresh.predict(x, verbose=0), expected) <= TOLERANCE


def test_what_the_file_cannot_hold_is_refused(tmp_path):
    model = adapted(bert())
    with pytest.raises(ValueError, match=r"must end in '\.lora\.h5'"):
        keras_pvera.save_lora_weights(model, tmp_path / "adapter.h5")
    key = adapted(bert(), target=["query", "key"])
    with pytest.raises(
        ValueError, match=r"key'\] are not layers that KerasHub's LoRA adapts"
    ):
        keras_pvera.save_lora_weights(key, tmp_path / "adapter.lora.h5")
    head = keras_pvera.apply(bert(), rank=4)  # the classifier trains in full
    with pytest.raises(ValueError, match="trains layers.*in full"):
        keras_pvera.save_lora_weights(head, tmp_path / "adapter.lora.h5")
    plain = keras_pvera.apply(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="query")]),
        rank=2,
    )
    with pytest.raises(ValueError, match="holds none"):
        keras_pvera.save_lora_weights(plain, tmp_path / "adapter.lora.h5")
    assert not list(tmp_path.iterdir())


def test_one_file_per_adapter(tmp_path):
    model = adapted(gpt2())
    model.add_adapter("other", rank=4)
    model.set_adapter("other")
    randomize(model, seed=1)
    x = {"token_ids": np.ones((2, 8), "int32"), "padding_mask": np.ones((2, 8), bool)}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected = model.predict(x, verbose=0)
        path = str(tmp_path / f"{name}.lora.h5")
        keras_pvera.save_lora_weights(model, path, adapter=name)
        fresh = gpt2()
        fresh.backbone.load_lora_weights(path)
        assert max_difference(fresh.predict(x, verbose=0), expected) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.architecture_matrix
@pytest.mark.parametrize("case", [c for c in CASES if not c.fallback], ids=str)
def test_keras_hub_loads_the_mean_as_its_lora(case, tmp_path, record_property):
    model = adapted(case.build())
    x = case.inputs(4, 1)
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / "adapter.lora.h5")
    keras_pvera.save_lora_weights(model, path)

    before = case.build().predict(x, verbose=0)
    fresh = case.build()
    backbone_of(fresh).load_lora_weights(path)
    difference = assert_loads_the_mean(before, fresh.predict(x, verbose=0), expected)
    record_property("keras_hub_lora_max_difference", difference)
