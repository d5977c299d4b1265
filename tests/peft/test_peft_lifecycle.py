"""The adapter lifecycle beside PEFT's: the same steps, the same outputs.

One tiny model is built twice, in PyTorch for PEFT 0.21 and in Keras for
keras_pvera, with the same weights, the same projections `A` and `B` and
the same adapter vectors. After each step (add, train a head copy, set,
disable, delete, merge, unmerge, several active, save and load) both
compute the same outputs, and warn alike where PEFT warns. Where the two
differ on purpose (docs/peft.md, "Differences from PEFT"), the test states
both behaviours. The Keras side runs on every backend; PEFT on torch.
"""

import warnings

import keras
import numpy as np
import pytest

import keras_pvera

torch = pytest.importorskip("torch")
# PEFT's PVeRA module, not just a `peft`: without PEFT installed, this
# folder (tests/peft, on the test path) would import as `peft`.
pytest.importorskip("peft.tuners.pvera")
import peft  # noqa: E402

TOLERANCE = 1e-5
TARGETS = ["hidden", "inner"]


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(6, 8)
        self.inner = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.inner(torch.relu(self.hidden(x))))


def keras_net():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    h = keras.layers.Dense(8, name="inner")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name="net")


def to_torch(array):
    return torch.from_numpy(np.array(array, dtype="float32"))


class Pair:
    """PEFT and keras_pvera on one model, stepped together."""

    def __init__(self, head_trained=True):
        torch.manual_seed(0)
        net = TorchNet()
        self.base = keras_net()
        for name in ("hidden", "inner", "head"):
            linear, dense = getattr(net, name), self.base.get_layer(name)
            dense.kernel.assign(linear.weight.detach().numpy().T)
            dense.bias.assign(linear.bias.detach().numpy())
        self.x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
        self.base_out = keras.ops.convert_to_numpy(self.base(self.x))
        head = ["head"] if head_trained else None
        self.peft = peft.get_peft_model(net, self.peft_config(head))
        self.peft.eval()
        self.keras = keras_pvera.apply(
            self.base, rank=4, target=TARGETS, trainable_layers=head
        )
        # The same projections on both sides: Keras' into PEFT's buffers.
        registry = self.keras.projection_registry
        for buffers, matrix in (
            (self.peft.base_model.pvera_A, registry.projection_a),
            (self.peft.base_model.pvera_B, registry.projection_b),
        ):
            buffers["default"].copy_(to_torch(keras.ops.convert_to_numpy(matrix)))
        self.set_vectors("default", seed=1)

    @staticmethod
    def peft_config(modules_to_save):
        return peft.PveraConfig(
            r=4,
            target_modules=TARGETS,
            modules_to_save=modules_to_save,
            projection_prng_key=0,
        )

    def add(self, name, head_trained=False, seed=2):
        head = ["head"] if head_trained else None
        self.peft.add_adapter(name, self.peft_config(head))
        self.peft.eval()
        self.keras.add_adapter(name, rank=4, target=TARGETS, trainable_layers=head)
        self.set_vectors(name, seed)

    def set_vectors(self, name, seed):
        rng = np.random.default_rng(seed)
        for path in TARGETS:
            module = getattr(self.peft.base_model.model, path)
            vectors = self.keras.base_model.get_layer(path).adapter_vectors[name]
            lambda_d = rng.normal(size=8).astype("float32") + 1.0
            lambda_b = rng.normal(size=8).astype("float32")
            module.pvera_lambda_d[name].data = to_torch(lambda_d)
            module.pvera_lambda_b[name].data = to_torch(lambda_b)
            vectors.lambda_d.assign(lambda_d)
            vectors.lambda_b.assign(lambda_b)

    def train_head(self, name, seed):
        """Sets the adapter's head copy as if trained, on both sides."""
        rng = np.random.default_rng(seed)
        kernel = rng.normal(size=(8, 3)).astype("float32")
        bias = rng.normal(size=3).astype("float32")
        copy = self.peft.base_model.model.head.modules_to_save[name]
        copy.weight.data = to_torch(kernel.T)
        copy.bias.data = to_torch(bias)
        keras_copy = self.keras.base_model.get_layer("head").copies[name]
        keras_copy.kernel.assign(kernel)
        keras_copy.bias.assign(bias)

    def outputs(self):
        with torch.no_grad():
            peft_out = self.peft.base_model(to_torch(self.x)).numpy()
        keras_out = keras.ops.convert_to_numpy(self.keras(self.x, training=False))
        return peft_out, keras_out

    def check(self, expected=None):
        """Both compute the same outputs (and `expected`, if given)."""
        peft_out, keras_out = self.outputs()
        np.testing.assert_allclose(keras_out, peft_out, atol=TOLERANCE)
        if expected is not None:
            np.testing.assert_allclose(keras_out, expected, atol=TOLERANCE)
        return keras_out

    def both(self, peft_step, keras_step):
        """Runs a step on each side; returns the warnings each gave."""
        given = []
        for step in (peft_step, keras_step):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
            given.append(sorted({str(w.message) for w in caught}))
        return given

    def peft_trainable(self):
        return sorted(n for n, p in self.peft.named_parameters() if p.requires_grad)


def test_heads_set_and_disable_as_peft():
    pair = Pair()
    pair.add("other", head_trained=True)
    pair.train_head("default", seed=3)
    pair.train_head("other", seed=4)
    first = pair.check()
    assert np.abs(first - pair.base_out).max() > 1e-2
    pair.both(
        lambda: pair.peft.base_model.set_adapter("other"),
        lambda: pair.keras.set_adapter("other"),
    )
    second = pair.check()
    assert np.abs(second - first).max() > 1e-2
    with pair.peft.disable_adapter(), pair.keras.disable_adapter():
        pair.check(pair.base_out)  # The original head runs on both sides.
        assert pair.peft_trainable() == [] and pair.keras.trainable_weights == []
    pair.check(second)
    # Two adapters with their own copies of one head cannot both run.
    with pytest.raises(ValueError):
        pair.peft.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="only one of them can be active"):
        pair.keras.set_adapter(["default", "other"])
    # An adapter without a head of its own runs the original head.
    pair.add("third", seed=5)
    pair.both(
        lambda: pair.peft.base_model.set_adapter("third"),
        lambda: pair.keras.set_adapter("third"),
    )
    pair.check()
    # Unloading keeps the active adapter's head copy on both sides.
    pair.both(
        lambda: pair.peft.base_model.set_adapter("other"),
        lambda: pair.keras.set_adapter("other"),
    )
    net = pair.peft.unload()
    base = pair.keras.unload()
    with torch.no_grad():
        peft_out = net(to_torch(pair.x)).numpy()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(base(pair.x)),
        peft_out,
        atol=TOLERANCE,
    )
    assert np.abs(peft_out - pair.base_out).max() > 1e-2  # The trained head.


def test_merge_unmerge_and_disable_while_merged_as_peft():
    pair = Pair()
    adapted = pair.check()
    pair.both(pair.peft.merge_adapter, pair.keras.merge_adapter)
    pair.check(adapted)
    warned = pair.both(pair.peft.merge_adapter, pair.keras.merge_adapter)
    assert warned[0] == warned[1] == ["All adapters are already merged, nothing to do."]
    pair.check(adapted)
    with pair.peft.disable_adapter(), pair.keras.disable_adapter():
        pair.check(pair.base_out)
    pair.check(adapted)
    # A difference: PEFT unmerged its layers to disable them; keras_pvera
    # took the deltas out on the fly and is merged as before.
    assert not pair.peft.base_model.model.hidden.merged
    assert pair.keras.merged_adapters == ["default"]
    pair.both(pair.peft.unmerge_adapter, pair.keras.unmerge_adapter)
    warned = pair.both(pair.peft.unmerge_adapter, pair.keras.unmerge_adapter)
    assert warned[0] == warned[1] == ["Already unmerged. Nothing to do."]
    pair.check(adapted)


def test_several_active_adapters_as_peft():
    pair = Pair(head_trained=False)
    pair.add("other", seed=2)
    pair.both(
        lambda: pair.peft.base_model.set_adapter(["default", "other"]),
        lambda: pair.keras.set_adapter(["default", "other"]),
    )
    assert pair.peft.active_adapters == pair.keras.active_adapters
    both = pair.check()
    assert pair.peft_trainable() == sorted(
        f"base_model.model.{path}.pvera_lambda_{v}.{name}"
        for path in TARGETS
        for v in "bd"
        for name in ("default", "other")
    )
    assert len(pair.keras.trainable_weights) == 8
    pair.both(
        lambda: pair.peft.merge_adapter(["default", "other"]),
        lambda: pair.keras.merge_adapter(["default", "other"]),
    )
    pair.check(both)
    pair.both(pair.peft.unmerge_adapter, pair.keras.unmerge_adapter)
    pair.check(both)
    pair.both(
        lambda: pair.peft.merge_adapter(["default"]),
        lambda: pair.keras.merge_adapter(["default"]),
    )
    warned = pair.both(
        lambda: pair.peft.merge_adapter(["other"]),
        lambda: pair.keras.merge_adapter(["other"]),
    )
    assert (
        warned[0]
        == warned[1]
        == [
            "Already following adapters were merged default. You are now "
            "additionally merging other."
        ]
    )
    pair.check(both)
    # Switching adapters unmerges first, with PEFT's warning.
    warned = pair.both(
        lambda: pair.peft.base_model.set_adapter("other"),
        lambda: pair.keras.set_adapter("other"),
    )
    assert (
        warned[0]
        == warned[1]
        == [
            "Adapter cannot be set when the model is merged. Unmerging the model first."
        ]
    )
    pair.check()


def test_delete_adapters_as_peft():
    pair = Pair(head_trained=False)
    pair.add("other", seed=2)
    pair.add("third", seed=3)
    pair.both(
        lambda: pair.peft.base_model.set_adapter("other"),
        lambda: pair.keras.set_adapter("other"),
    )
    warned = pair.both(
        lambda: pair.peft.delete_adapter("other"),
        lambda: pair.keras.delete_adapter("other"),
    )
    assert warned[0] == warned[1]
    assert pair.peft.active_adapters == pair.keras.active_adapters == ["default"]
    pair.check()
    for name in ("third", "default"):
        pair.both(
            lambda n=name: pair.peft.delete_adapter(n),
            lambda n=name: pair.keras.delete_adapter(n),
        )
    assert pair.peft.active_adapters == pair.keras.active_adapters == []
    # Both compute the base model's outputs. (PEFT's PeftModel itself then
    # fails on a stale active adapter; its `base_model` runs.)
    pair.check(pair.base_out)


def test_leaving_a_mixed_disable_state():
    pair = Pair(head_trained=False)
    pair.peft.base_model.model.hidden.enable_adapters(False)
    pair.keras.base_model.get_layer("hidden").adapter_enabled = False
    pair.check()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pair.peft.disable_adapter(), pair.keras.disable_adapter():
            pair.check(pair.base_out)
    warned = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(warned) == 2  # One each.
    assert all("some adapter layers that are enabled" in w for w in warned)
    # A difference: PEFT enables every layer on leaving; keras_pvera puts
    # each back as it was (its warning says so).
    assert not pair.peft.base_model.model.hidden.disable_adapters
    assert not pair.keras.base_model.get_layer("hidden").adapter_enabled
    assert pair.keras.base_model.get_layer("inner").adapter_enabled


def test_save_and_load_keep_what_peft_computes(tmp_path):
    pair = Pair()
    pair.add("other", head_trained=True)
    pair.add("third", seed=5)
    pair.train_head("default", seed=3)
    pair.train_head("other", seed=4)
    pair.both(
        lambda: pair.peft.base_model.set_adapter(["other", "third"]),
        lambda: pair.keras.set_adapter(["other", "third"]),
    )
    expected = pair.check()
    pair.keras.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.active_adapters == ["other", "third"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(pair.x, training=False)),
        expected,
        atol=TOLERANCE,
    )
    with loaded.disable_adapter():
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(loaded(pair.x, training=False)),
            pair.base_out,
            atol=TOLERANCE,
        )
