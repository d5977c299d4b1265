"""Adapter-only files: `save_adapter`, `load_adapter` and `hotswap_adapter`.

An adapter file holds only what PVeRA adds to a base model, so one base model
can serve many tiny adapters. The format is safetensors: a JSON header
followed by raw little-endian tensor bytes. Reading it runs no code (unlike
pickle), needs neither torch nor h5py, and the header carries the settings
as plain JSON metadata.

Tensors:
- `pvera_lambda_d`: the `lambda_d` of every adapted layer, stacked,
  shape `(num_layers, 2 * rank)`.
- `pvera_lambda_b`: the `lambda_b` of every adapted layer, concatenated in
  layer order, shape `(sum of out_dims,)`.
- `pvera_A`, `pvera_B`: the shared projections, unless the model was adapted
  with `save_projection=False` (then they are regenerated from the seed).
- `trainable/<k>/<j>`: weight `j` of the `k`-th layer trained in full beside
  the adapters (`trainable_layers` of `keras_pvera.apply`), if any.

Metadata: `format` = `"keras_pvera.adapter"` and `keras_pvera`, a JSON object
with `format_version`, `settings` (the `apply` settings), `layers` (a list of
`[path, in_dim, out_dim]`) and `trainable_layers` (a list of
`[path, [weight shapes]]`), and `addresses` (each of those paths to
`[address, class name]`, which finds the layers in a base model whose layer
names differ; files without it are read by names only). Stacking the
vectors keeps the header small: with `save_projection=False` a file is the
vectors' raw bytes plus a few KiB.
"""

import json

import numpy as np

from keras_pvera.src.layers.pvera_config import ADAPTER_SETTING_NAMES
from keras_pvera.src.layers.pvera_config import PVeRAConfig
from keras_pvera.src.layers.pvera_config import projection_out_max
from keras_pvera.src.saving import safetensors_io
from keras_pvera.src.saving.adapter_state import AdapterState
from keras_pvera.src.saving.adapter_state import adapter_state_of
from keras_pvera.src.saving.adapter_state import hotswap_state
from keras_pvera.src.saving.adapter_state import restore_adapter
from keras_pvera.src.utils import checks

FORMAT = "keras_pvera.adapter"
# Version 2 marks a file holding a setting that version-1 readers would drop
# without a word (`max_log_variance`): they refuse it instead. Files without
# one stay version 1, readable by every keras_pvera.
FORMAT_VERSION = 2


def save_adapter(model, path, adapter=None):
    """Saves one adapter of an adapted model to a safetensors file.

    The file holds the vectors of every adapted layer, the `apply` settings,
    the adapted layers' paths and sizes, the shared projections unless the
    model was adapted with `save_projection=False`, and the weights of layers
    trained in full (`trainable_layers`), if any. The write is atomic: an
    interrupted save leaves `path` as it was.

    Args:
        model: A `PVeRAModel` (what `keras_pvera.apply` returns).
        path: The file to write, by convention ending in `.safetensors`.
        adapter: The adapter's name; `None` for the active one.

    Raises:
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: If the model saves no projections but its projections
            are not the ones its seed generates (they were loaded from a
            file), so a file without them would load wrong; or if the model
            has no adapter named `adapter`.

    Returns:
        None. The file is at `path`.

    Example:

    >>> import os, tempfile
    >>> import keras, keras_pvera
    >>> import numpy as np
    >>> def base():
    ...     return keras.Sequential([keras.Input((8,)),
    ...                              keras.layers.Dense(16, name="hidden"),
    ...                              keras.layers.Dense(3, name="head")])
    >>> model = keras_pvera.apply(base(), rank=4, target=["hidden"])
    >>> _ = model.adapted_layers["hidden"].lambda_b.assign(np.ones(16))
    >>> path = os.path.join(tempfile.mkdtemp(), "task.safetensors")
    >>> keras_pvera.save_adapter(model, path)
    >>> os.path.getsize(path) < 2000  # vectors and the 8x8 and 16x4 projections
    True
    """
    state = adapter_state_of(model, adapter)
    if not state.config.save_projection:
        state.require_seed_made(
            state.projections,
            "This model was adapted with save_projection=False, so the file "
            "holds no projections",
            "Adapt the base model with save_projection=True.",
        )
        state.projections = None
    tensors, metadata = encode_adapter(state)
    safetensors_io.write_safetensors(path, tensors, metadata)


def load_adapter(model, path, adapter=None):
    """Loads an adapter file onto a model.

    On a base model (not adapted yet), applies PVeRA with the file's settings
    to the file's layers, then sets the stored values. On a `PVeRAModel`
    that has an adapter of that name, checks that it matches the file (same
    adapted layers and sizes, rank, seed and alpha; same layers trained in
    full) and sets the stored values; the adapter keeps its own dropout, KL
    weight, sampling switch and `max_log_variance`. On a `PVeRAModel`
    without one, adds the file as a new adapter of that name (not made
    active).

    Args:
        model: A base Keras model, or a `PVeRAModel`.
        path: A file written by `save_adapter`.
        adapter: The adapter's name; `None`: `"default"` on a base model,
            the active adapter on an adapted one.

    Returns:
        The adapted `PVeRAModel` (`model` itself if it was one).

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: For a truncated or foreign file, or a file that does not
            match the model; the message names the first mismatch, and the
            model is left unchanged.

    Example:

    A file written by `save_adapter` (see its example), on a fresh copy of
    the base model (the same architecture and base weights):

    >>> import os, tempfile
    >>> import keras, keras_pvera
    >>> import numpy as np
    >>> def base():
    ...     keras.utils.set_random_seed(0)
    ...     return keras.Sequential([keras.Input((8,)),
    ...                              keras.layers.Dense(16, name="hidden"),
    ...                              keras.layers.Dense(3, name="head")])
    >>> model = keras_pvera.apply(base(), rank=4, target=["hidden"])
    >>> _ = model.adapted_layers["hidden"].lambda_b.assign(np.ones(16))
    >>> path = os.path.join(tempfile.mkdtemp(), "task.safetensors")
    >>> keras_pvera.save_adapter(model, path)
    >>> loaded = keras_pvera.load_adapter(base(), path)
    >>> x = np.ones((2, 8), "float32")
    >>> bool(np.allclose(loaded.predict(x, verbose=0),
    ...                  model.predict(x, verbose=0)))
    True
    """
    tensors, metadata = safetensors_io.read_safetensors(path)
    state = decode_adapter(tensors, metadata, source=repr(str(path)))
    return restore_adapter(model, state, adapter)


def hotswap_adapter(model, path, adapter_name="default"):
    """Swaps a saved adapter's values into a loaded adapter, in place.

    A PVeRA adapter's frozen projections come from its seed, so two adapters
    of one shape differ only in their vectors (and the weights of the layers
    they train in full). This assigns the file's into the variables of the
    loaded adapter `adapter_name`: the model's compiled `predict` (and a
    KerasHub task's `generate`) runs on, with no new trace on JAX or
    TensorFlow, and gives what a fresh `load_adapter` of the file gives.
    What the compiled functions were traced with must match: the file is
    refused unless it has the adapter's adapted layers and sizes, rank,
    seed, alpha, fused groups, layers trained in full, and projections (or
    none, with the model's made by the seed). Everything is checked before
    anything is assigned. `load_adapter` onto an adapter of that name keeps
    compiled functions too; this is the name for a serving swap, and it
    also refuses other projections and a name not loaded.

    Args:
        model: A `PVeRAModel` (what `keras_pvera.apply` or `load_adapter`
            returns).
        path: A file written by `save_adapter`.
        adapter_name: The loaded adapter whose values to replace.

    Raises:
        FileNotFoundError: If `path` does not exist.
        TypeError: If `model` is not a `PVeRAModel`.
        ValueError: For a name the model has no adapter of (the message
            names those it has), an adapter merged into the kernels, a
            truncated or foreign file, or a file that does not match the
            adapter (the message names the first difference); the model is
            then unchanged.

    Example:

    >>> import os, tempfile
    >>> import keras, keras_pvera
    >>> import numpy as np
    >>> def base():
    ...     keras.utils.set_random_seed(0)
    ...     return keras.Sequential([keras.Input((8,)),
    ...                              keras.layers.Dense(16, name="hidden"),
    ...                              keras.layers.Dense(3, name="head")])
    >>> task = keras_pvera.apply(base(), rank=4, target=["hidden"])
    >>> _ = task.adapted_layers["hidden"].lambda_b.assign(np.ones(16))
    >>> path = os.path.join(tempfile.mkdtemp(), "task.safetensors")
    >>> keras_pvera.save_adapter(task, path)
    >>> served = keras_pvera.apply(base(), rank=4, target=["hidden"])
    >>> x = np.ones((2, 8), "float32")
    >>> _ = served.predict(x, verbose=0)
    >>> compiled = served.predict_function
    >>> keras_pvera.hotswap_adapter(served, path)
    >>> served.predict_function is compiled
    True
    >>> bool(np.allclose(served.predict(x, verbose=0),
    ...                  task.predict(x, verbose=0)))
    True
    """
    tensors, metadata = safetensors_io.read_safetensors(path)
    state = decode_adapter(tensors, metadata, source=repr(str(path)))
    hotswap_state(model, state, adapter_name)


def encode_adapter(state):
    """Turns an `AdapterState` into safetensors tensors and metadata.

    Args:
        state: An `AdapterState`; its projections are written when present.

    Returns:
        A tuple `(tensors, metadata)` for `safetensors_io.write_safetensors`.
    """
    paths = list(state.layers)
    header = {
        "format_version": 1 if state.config.max_log_variance is None else 2,
        "settings": {
            name: getattr(state.config, name) for name in ADAPTER_SETTING_NAMES
        },
        "layers": [[p, *state.layers[p]] for p in paths],
        "trainable_layers": [
            [p, [list(w.shape) for w in weights]]
            for p, weights in state.trainable.items()
        ],
        "addresses": state.addresses,
    }
    tensors = {
        "pvera_lambda_d": np.stack(
            [np.asarray(state.lambda_d[p], "float32") for p in paths]
        ),
        "pvera_lambda_b": np.concatenate(
            [np.asarray(state.lambda_b[p], "float32") for p in paths]
        ),
    }
    if state.projections is not None:
        tensors["pvera_A"] = np.asarray(state.projections[0], "float32")
        tensors["pvera_B"] = np.asarray(state.projections[1], "float32")
    for k, weights in enumerate(state.trainable.values()):
        for j, weight in enumerate(weights):
            tensors[f"trainable/{k}/{j}"] = np.asarray(weight)
    metadata = {
        "format": FORMAT,
        "keras_pvera": json.dumps(header, separators=(",", ":")),
    }
    return tensors, metadata


def decode_adapter(tensors, metadata, source="the file"):
    """Turns safetensors tensors and metadata back into an `AdapterState`.

    Args:
        tensors: A dict from name to NumPy array.
        metadata: The file's string metadata.
        source: How error messages name the file.

    Returns:
        An `AdapterState`.

    Raises:
        ValueError: Naming the first problem: a foreign file, a newer format,
            a missing or malformed entry, a missing, unexpected or misshapen
            tensor.
    """
    config, header = _decode_header(tensors, metadata, source)
    layers = _decode_layers(header["layers"], source)
    trainable_shapes = _decode_trainable(header["trainable_layers"], source)
    addresses = _decode_addresses(header.get("addresses", {}), source)
    _check_tensors(tensors, _tensor_shapes(config, layers, trainable_shapes), source)

    lambda_d, lambda_b, offset = {}, {}, 0
    for i, (path, (_, out_dim)) in enumerate(layers.items()):
        lambda_d[path] = tensors["pvera_lambda_d"][i]
        lambda_b[path] = tensors["pvera_lambda_b"][offset : offset + out_dim]
        offset += out_dim
    projections = None
    if config.save_projection:
        projections = (tensors["pvera_A"], tensors["pvera_B"])
    trainable = {
        path: [tensors[f"trainable/{k}/{j}"] for j in range(len(shapes))]
        for k, (path, shapes) in enumerate(trainable_shapes.items())
    }
    return AdapterState(
        config=config,
        layers=layers,
        lambda_d=lambda_d,
        lambda_b=lambda_b,
        projections=projections,
        trainable=trainable,
        addresses=addresses,
    )


def _decode_header(tensors, metadata, source):
    """The file's `PVeRAConfig` and its checked `keras_pvera` header."""
    if metadata.get("format") != FORMAT:
        hint = ""
        if any(name.startswith("base_model.") for name in tensors):
            hint = (
                " It looks like a PEFT adapter: read its folder with "
                "keras_pvera.load_peft_adapter."
            )
        raise ValueError(
            f"{source} is not a keras_pvera adapter file: its metadata has "
            f"format={metadata.get('format')!r}, expected {FORMAT!r}.{hint}"
        )
    try:
        header = json.loads(metadata["keras_pvera"])
        version = header["format_version"]
        settings = header["settings"]
        for key in ("layers", "trainable_layers"):
            if key not in header:
                raise KeyError(key)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{source} has malformed keras_pvera metadata ({type(e).__name__}: {e})."
        ) from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version={version!r}; this keras_pvera "
            f"reads version {FORMAT_VERSION} and older. Upgrade keras_pvera."
        )
    if not isinstance(settings, dict):
        raise ValueError(f"{source} has malformed settings: {settings!r}")
    # Files written before fused groups, generator seeds and log-variance
    # bounds have none.
    settings = {
        "fused_groups": None,
        "generator_seed": None,
        "max_log_variance": None,
        **settings,
    }
    for name in ADAPTER_SETTING_NAMES:
        if name not in settings:
            raise ValueError(f"{source} has no setting {name!r}.")
    try:
        config = PVeRAConfig.from_dict(
            {name: settings[name] for name in ADAPTER_SETTING_NAMES}
        )
    except ValueError as e:
        raise ValueError(f"{source} has a bad setting: {e}") from None
    return config, header


def _tensor_shapes(config, layers, trainable_shapes):
    """`{tensor name: shape}` of everything a file for these layers holds."""
    rank = config.rank
    expected = {
        "pvera_lambda_d": (len(layers), 2 * rank),
        "pvera_lambda_b": (sum(out_dim for _, out_dim in layers.values()),),
    }
    if config.save_projection:
        in_max = max(in_dim for in_dim, _ in layers.values())
        out_max = projection_out_max(
            config.fused_groups, {p: out for p, (_, out) in layers.items()}
        )
        expected["pvera_A"] = (2 * rank, in_max)
        expected["pvera_B"] = (out_max, rank)
    for k, shapes in enumerate(trainable_shapes.values()):
        for j, shape in enumerate(shapes):
            expected[f"trainable/{k}/{j}"] = shape
    return expected


def _check_tensors(tensors, expected, source):
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{source} is missing tensor {name!r}.")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape "
                f"{tuple(tensors[name].shape)}, its metadata says {shape}."
            )
    for name in tensors:
        if name not in expected:
            raise ValueError(f"{source} has an unexpected tensor {name!r}.")


def _decode_addresses(addresses, source):
    if not isinstance(addresses, dict) or not all(
        isinstance(row, list) and len(row) == 2 and all(isinstance(v, str) for v in row)
        for row in addresses.values()
    ):
        raise ValueError(
            f"{source} has malformed addresses {addresses!r}; expected "
            "{path: [address, class name]}."
        )
    return addresses


def _decode_layers(rows, source):
    layers = {}
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{source} lists no adapted layers.")
    for row in rows:
        if (
            not isinstance(row, list)
            or len(row) != 3
            or not isinstance(row[0], str)
            or not all(_is_size(v) for v in row[1:])
        ):
            raise ValueError(
                f"{source} has a malformed layer entry {row!r}; expected "
                "[path, in_dim, out_dim]."
            )
        if row[0] in layers:
            raise ValueError(f"{source} lists layer {row[0]!r} twice.")
        layers[row[0]] = (row[1], row[2])
    return layers


def _decode_trainable(rows, source):
    trainable = {}
    if not isinstance(rows, list):
        raise ValueError(f"{source} has malformed trainable_layers: {rows!r}")
    for row in rows:
        if (
            not isinstance(row, list)
            or len(row) != 2
            or not isinstance(row[0], str)
            or not isinstance(row[1], list)
            or not all(
                isinstance(s, list) and all(_is_size(v, 0) for v in s) for s in row[1]
            )
        ):
            raise ValueError(
                f"{source} has a malformed trainable layer entry {row!r}; "
                "expected [path, [shape, ...]]."
            )
        trainable[row[0]] = [tuple(s) for s in row[1]]
    return trainable


def _is_size(value, minimum=1):
    return checks.is_integer(value, minimum)
