"""`AdapterLayer`: the base of every layer that holds named adapters.

An adapted layer (`PVeRADense`, `PVeRAEmbedding`) and a layer trained in
full (`TrainedCopies`) both hold something per adapter name (vectors, or a
trained copy) and keep the same state about those names: which adapters are
active (they run and train), whether the adapters are enabled at all, and
which are merged into the base kernel. This class keeps that state and its
rules once:

- names are checked (`check_adapter_name`) and "`None`, a name or a list"
  is read as a tuple of names (`as_names`);
- only the active adapters' weights train, and only while the layer is
  trainable and its adapters are enabled; the wrapped layer never trains;
- nothing that changes the adapters runs while some are merged.

A subclass says what it holds per name (`_adapters`), which trainable
items belong to a name (`_trainables_of`) and which always stay frozen
(`_always_frozen`). `AdapterRegistry` and `PVeRAModel` ask the layers for
this state instead of keeping their own.
"""

import keras

from keras_pvera.src.layers.wrapped_layer import AsWrappedLayer


def as_names(adapter_name):
    """`None`, a name or a list of names, as a tuple of names.

    Example:

    >>> as_names(None), as_names("a"), as_names(["a", "b"])
    ((), ('a',), ('a', 'b'))
    """
    if adapter_name is None:
        return ()
    if isinstance(adapter_name, str):
        return (adapter_name,)
    return tuple(adapter_name)


def check_adapter_name(adapter_name):
    """Raises `ValueError` unless `adapter_name` is a non-empty string
    without `/` (names are parts of weight paths in saved files)."""
    if not isinstance(adapter_name, str) or not adapter_name or "/" in adapter_name:
        raise ValueError(
            "An adapter name must be a non-empty string without '/'. "
            f"Received: adapter_name={adapter_name!r}"
        )


def check_not_merged(merged, action, where):
    """Raises `ValueError` for `action` while adapters `merged` are merged
    into the kernel(s) `where` names."""
    if merged:
        raise ValueError(
            f"Cannot {action} while adapters {list(merged)} are merged into "
            f"{where}. Call `model.unmerge_adapter()` first."
        )


def one_or_list(names):
    """A tuple of names as PEFT reports it: `None`, the name, or a list."""
    if len(names) > 1:
        return list(names)
    return names[0] if names else None


class AdapterLayer(AsWrappedLayer, keras.layers.Layer):
    """Base of the layers holding named adapters: their state and its rules.

    Subclasses define `_adapters()` (`{name: what the layer holds for it}`,
    in the order added), `_trainables_of(name)` (the variables or layers
    that train when adapter `name` does) and `_always_frozen()` (what
    never trains: the wrapped layer), and `wrapped_layer()`.

    Example:

    >>> layer = keras.layers.Dense(2)
    >>> layer.build((None, 3))
    >>> from keras_pvera.src.layers.trained_copies import TrainedCopies
    >>> copies = TrainedCopies(layer)
    >>> copies.add_copy("a")
    >>> copies.set_active_adapter(["a", "not held"])
    >>> copies.active_adapter, copies.adapter_enabled, copies.merged_adapter
    ('a', True, None)
    """

    # Names as tuples: Keras would track (and copy) lists.
    active_names = ()
    merged_names = ()
    enabled = True

    def _adapters(self):
        """`{name: what this layer holds for it}`, in the order added."""
        raise NotImplementedError

    def _trainables_of(self, adapter_name):
        """The variables or layers that train when `adapter_name` does."""
        raise NotImplementedError

    def _always_frozen(self):
        """What never trains (the wrapped layer)."""
        raise NotImplementedError

    @property
    def adapter_names(self):
        """The names of this layer's adapters, in the order they were added."""
        return list(self._adapters())

    @property
    def active_adapters(self):
        """The names of the adapters that run and train, a list."""
        return list(self.active_names)

    @property
    def active_adapter(self):
        """The active adapter's name; `None` if none, a list if several."""
        return one_or_list(self.active_names)

    @property
    def merged_adapters(self):
        """The names of the adapters merged into the kernel, in merge order."""
        return list(self.merged_names)

    @property
    def merged_adapter(self):
        """The merged adapter's name; `None` if none, a list if several."""
        return one_or_list(self.merged_names)

    def set_active_adapter(self, adapter_name):
        """Makes `adapter_name` the adapter (or adapters) that run and train.

        Args:
            adapter_name: A name, a list of names, or `None`; names this
                layer does not hold are left out (none left: the wrapped
                layer alone runs).

        Raises:
            ValueError: If an adapter is merged into the kernel, or (as a
                subclass checks) the layer cannot run these names together.
        """
        held = tuple(n for n in as_names(adapter_name) if n in self._adapters())
        self._check_can_activate(held, adapter_name)
        if held != self.active_names:
            self._check_not_merged("switch adapters")
        self.active_names = held
        self._apply_trainability()

    def _check_can_activate(self, held, adapter_name):
        """Raises if adapters `held` cannot be active together."""

    @property
    def adapter_enabled(self):
        """Whether the active adapters run (PEFT's `enable_adapters`).

        Set it to `False` to compute the wrapped layer's output; nothing of
        the adapters trains then either.
        """
        return self.enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value):
        self.enabled = bool(value)
        self._apply_trainability()

    def _forget(self, adapter_name):
        """Drops a deleted adapter from the active ones."""
        self.active_names = tuple(n for n in self.active_names if n != adapter_name)

    def _check_not_merged(self, action):
        check_not_merged(
            self.merged_names, action, f"the kernel of layer {self.name!r}"
        )

    @property
    def trainable(self):
        """Whether the active adapters train (the wrapped layer never does)."""
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        # Keras' setter sets every sublayer and variable: set them back, so
        # that toggling `trainable` never thaws the wrapped layer.
        keras.layers.Layer.trainable.fset(self, value)
        self._apply_trainability()

    def _apply_trainability(self):
        """The one rule: an adapter's weights train when the layer is
        trainable, its adapters enabled and that adapter active."""
        try:
            adapters = self._adapters()
        except AttributeError:  # While Keras' `Layer.__init__` runs.
            return
        for item in self._always_frozen():
            item.trainable = False
        for name in adapters:
            train = self.trainable and self.enabled and name in self.active_names
            for item in self._trainables_of(name):
                item.trainable = train
