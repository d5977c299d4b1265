"""save_lora_weights: an adapter's mean as KerasHub's own `.lora.h5` file.

KerasHub's `backbone.load_lora_weights(path)` on a fresh build of the same
model (the builders of hub_architectures.py give the same weights
every call) must give the adapted model's mean outputs.
"""

import warnings

import keras
import numpy as np
import pytest
from hub_architectures import CASES
from hub_architectures import TEXTS
from hub_architectures import bert
from hub_architectures import gpt2
from hub_architectures import numpy_outputs
from hub_architectures import randomize

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


def loaded_outputs(build, path, x):
    """A fresh build's outputs on `x` once KerasHub loaded the LoRA file.
    (Its `predict` must not run before: on TensorFlow a predict function
    traced before `enable_lora` keeps computing without LoRA.)"""
    fresh = backbone_of(build())
    fresh.load_lora_weights(str(path))
    return fresh.predict(x, verbose=0)


GPT2_TOKENS = {
    "token_ids": np.arange(16).reshape(2, 8) % 7 + 1,
    "padding_mask": np.ones((2, 8), bool),
}


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


# Fast-tier exactness: save_lora_weights' doctest. These compile two models'
# predict per adapter: under 1 s on torch, about 10 s on JAX.
@pytest.mark.slow
def test_one_file_per_adapter_each_its_mean(tmp_path):
    base = gpt2().backbone
    before = base.predict(GPT2_TOKENS, verbose=0)
    model = adapted(base)
    model.add_adapter("other", rank=4, sample_at_inference=True)
    model.set_adapter("other")
    randomize(model, seed=1)
    for name in ("default", "other"):
        model.set_adapter(name)
        model.sample_at_inference = False
        expected = model.predict(GPT2_TOKENS, verbose=0)  # the mean
        model.sample_at_inference = name == "other"  # written as its mean
        path = tmp_path / f"{name}.lora.h5"
        keras_pvera.save_lora_weights(model, path, adapter=name)
        actual = loaded_outputs(gpt2, path, GPT2_TOKENS)
        assert_loads_the_mean(before, actual, expected)


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
