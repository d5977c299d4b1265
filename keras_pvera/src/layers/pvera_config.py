"""`PVeRAConfig`: every PVeRA setting, validated once, in one object.

`keras_pvera.apply`, `PVeRAModel.add_adapter`, `.keras` saving, adapter files
and the PEFT mapping all read and write this one object; the list of settings
is written here and nowhere else (`SETTING_NAMES` is derived from it).
"""

import dataclasses

from keras_pvera.src.utils import checks


@dataclasses.dataclass(frozen=True)
class PVeRAConfig:
    """The settings of one PVeRA adapter.

    Every value is checked when the object is made; a bad one raises a
    `ValueError` naming it and what would be right. The object is frozen:
    `config.replace(rank=8)` returns a changed copy.

    Args:
        rank: Latent size `r` (PEFT's `r`), a positive integer.
        target: Which layers to adapt: a list of layer names (a name matches
            every layer of that name at any depth), a regex string matched
            against layer names and paths, a callable `(layer) -> bool`, or
            `"all"` (every Dense/EinsumDense except those producing the
            model's outputs). Names, a regex or a callable may also choose
            `Conv1D`/`Conv2D`/`Conv3D` (groups=1) and `Embedding` layers.
            `None`: in a KerasHub model, its backbones'
            `default_lora_layer_names()`, else (with a warning naming them)
            its attention projections, fused ones as one layer; in another
            model, `query`/`value`/`query_dense`/`value_dense` when it has
            such layers, else `"all"`.
        seed: Seed of the shared projections and of the sampling noise (PEFT's
            `projection_prng_key`), a non-negative integer.
        generator_seed: Seed of the sampling noise instead of `seed` (PEFT's
            `generator_seed`), a non-negative integer; `None` (the default):
            the noise is seeded from `seed`. The noise is always seeded, so
            runs repeat; PEFT's `None` draws from torch's global generator
            instead, which no seed of a PEFT file records. Each adapted
            layer draws its own stream, derived from this seed.
        alpha: Output scale of the adapters (PEFT has none: 1).
        d_initial: Initial value of `lambda_d` (PEFT's `d_initial`).
        dropout: Dropout rate on the adapters' input, in `[0, 1)` (PEFT's
            `pvera_dropout`).
        kl_weight: Weight of the KL term added to the training loss; 0 turns
            it off. The paper used 1e-16 to 1e-6.
        save_projection: Whether saved files hold the projections (PEFT's
            `save_projection`); if not, they are regenerated from `seed`.
        sample_at_inference: Whether inference samples the latent code
            (PEFT's `sample_at_inference`).
        trainable_layers: Layers that train in full beside the adapters, for
            example a new head (PEFT's `modules_to_save`): a list of names, a
            regex string or a callable, as for `target`. `None`: the head
            of a KerasHub task (its own layers with weights outside its
            backbone and preprocessor, such as `TextClassifier`'s
            `logits`), nothing for other models; `[]`: nothing.
        fused_groups: Groups of adapted layers that are one fused linear map
            in the original model, such as GPT-2's `c_attn`, which KerasHub
            splits into `query`, `key` and `value`: a list of lists of layer
            paths, each in the fused map's output order. The layers of a
            group share one latent (one `lambda_d` variable and one noise
            draw, as the fused map has) and read consecutive row ranges of
            `B` and of the fused `lambda_b`, so the group computes exactly
            PEFT's adapter of the fused module. Every path must be adapted.
            `None` (the default): no groups. `load_peft_adapter` sets it.
        max_log_variance: An upper bound on the latent log-variance, a
            finite number > 0, or `None` (the default): no bound, PEFT's
            PVeRA. The log-variance is clipped, `minimum(logvar,
            max_log_variance)`, before the noise and the KL term use it, so
            the noise's standard deviation is at most
            `exp(max_log_variance / 2)` and inputs far outside the training
            data's scale give finite samples instead of overflowing. Below
            the bound the values are exactly the unbounded ones; above it
            the log-variance gets no gradient. PEFT files cannot hold a
            bound: `save_peft_adapter` refuses an adapter that has one.

    Raises:
        ValueError: For a bad value, naming it.

    Example:

    >>> config = PVeRAConfig(rank=8, target=["query", "value"])
    >>> config.replace(kl_weight=1e-6).kl_weight
    1e-06
    >>> PVeRAConfig.from_dict(config.to_dict()) == config
    True
    """

    rank: int = 256
    target: object = None
    seed: int = 0
    generator_seed: object = None
    alpha: float = 1.0
    d_initial: float = 0.1
    dropout: float = 0.0
    kl_weight: float = 0.0
    save_projection: bool = True
    sample_at_inference: bool = False
    trainable_layers: object = None
    fused_groups: object = None
    max_log_variance: object = None

    def __post_init__(self):
        # Every value is checked before any changes; each is then stored as
        # a plain Python value, so that configs compare and serialize alike.
        plain = {
            **_integers(self),
            **_numbers(self),
            **_booleans(self),
            **_selectors(self),
            "fused_groups": _fused_groups(self.fused_groups),
        }
        for name, value in plain.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes):
        """A copy with some settings changed (and checked).

        Args:
            **changes: Settings by name.

        Returns:
            A `PVeRAConfig`.

        Raises:
            ValueError: For an unknown name or a bad value.
        """
        check_setting_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """The settings as a JSON-ready dict.

        A callable `target` or `trainable_layers` cannot be written as JSON:
        it is stored as `None` (saved models keep the adapted layers' paths,
        which is what loading needs).

        Returns:
            A dict from setting name to value.
        """
        config = dataclasses.asdict(self)
        for name in ("target", "trainable_layers"):
            value = config[name]
            if callable(value) and not isinstance(value, str):
                config[name] = None
            elif isinstance(value, tuple):
                config[name] = list(value)
        if self.fused_groups is not None:
            config["fused_groups"] = [list(group) for group in self.fused_groups]
        return config

    @classmethod
    def from_dict(cls, config):
        """Makes a config from `to_dict`'s output (unknown names refused).

        Args:
            config: A dict from setting name to value.

        Returns:
            A `PVeRAConfig`.

        Raises:
            ValueError: For an unknown name or a bad value.
        """
        check_setting_names(config)
        return cls(**config)

    @classmethod
    def from_settings(cls, config=None, **settings):
        """`config` (or the defaults) with `settings` on top.

        Args:
            config: A `PVeRAConfig`, or `None` for the defaults.
            **settings: Settings by name, overriding `config`'s.

        Returns:
            A `PVeRAConfig`.

        Raises:
            ValueError: For an unknown name, a bad value, or a `config` that
                is not a `PVeRAConfig`.
        """
        if config is None:
            return cls.from_dict(settings)
        if not isinstance(config, cls):
            raise ValueError(
                "`config` must be a keras_pvera.PVeRAConfig. "
                f"Received: config={config!r} of type {type(config).__name__}"
            )
        return config.replace(**settings) if settings else config


SETTING_NAMES = tuple(field.name for field in dataclasses.fields(PVeRAConfig))

# The settings that choose layers; the others say what an adapter computes
# and how it is saved, and are what adapter files store.
SELECTOR_NAMES = ("target", "trainable_layers")
ADAPTER_SETTING_NAMES = tuple(n for n in SETTING_NAMES if n not in SELECTOR_NAMES)


def check_setting_names(settings):
    """Raises `ValueError` for a name that is not a PVeRA setting."""
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(
            f"Unknown PVeRA setting {unknown[0]!r}. "
            f"PVeRA settings: {', '.join(SETTING_NAMES)}."
        )


def split_settings(kwargs):
    """Splits keyword arguments into PVeRA settings and the rest.

    Args:
        kwargs: A dict of keyword arguments.

    Returns:
        A tuple `(settings, rest)` of dicts.
    """
    settings = {k: v for k, v in kwargs.items() if k in SETTING_NAMES}
    rest = {k: v for k, v in kwargs.items() if k not in SETTING_NAMES}
    return settings, rest


def fused_offsets(fused_groups, out_dims):
    """Each grouped layer's first row in its fused map, and the map's size.

    Args:
        fused_groups: A config's `fused_groups` (or `None`).
        out_dims: A dict from layer path to its output size.

    Returns:
        A dict from each grouped path to `(offset, group)`: the layer reads
        rows `[offset, offset + out)` of `B` and of the group's `lambda_b`;
        `group` is the tuple of the group's paths.

    Example:

    >>> fused_offsets([["q", "k"]], {"q": 4, "k": 4, "o": 4})
    {'q': (0, ('q', 'k')), 'k': (4, ('q', 'k'))}
    """
    offsets = {}
    for group in fused_groups or ():
        offset = 0
        for path in group:
            offsets[path] = (offset, tuple(group))
            offset += out_dims[path]
    return offsets


def projection_out_max(fused_groups, out_dims):
    """The rows of `B` that the layers need: fused groups read theirs in a row.

    Args:
        fused_groups: A config's `fused_groups` (or `None`).
        out_dims: A dict from layer path to its output size.

    Returns:
        An integer: the largest `offset + out` over the layers.
    """
    offsets = fused_offsets(fused_groups, out_dims)
    return max(offsets.get(path, (0, None))[0] + out for path, out in out_dims.items())


def _integers(config):
    """`rank`, `seed` and `generator_seed` (or None), checked, as `int`s."""
    plain = {
        "rank": checks.checked_integer(
            config.rank, "rank", expected="a positive integer, for example 256"
        ),
        "seed": checks.checked_integer(
            config.seed, "seed", minimum=0, expected="a non-negative integer"
        ),
        "generator_seed": None,
    }
    if config.generator_seed is not None:
        plain["generator_seed"] = checks.checked_integer(
            config.generator_seed,
            "generator_seed",
            minimum=0,
            expected="a non-negative integer or None",
        )
    return plain


def _numbers(config):
    """The real-valued settings, checked, as `float`s (a bound or None)."""
    plain = {
        name: checks.checked_number(
            getattr(config, name), name, lambda v: v > 0, "a finite number > 0"
        )
        for name in ("alpha", "d_initial")
    }
    plain["dropout"] = checks.checked_number(
        config.dropout, "dropout", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"
    )
    plain["kl_weight"] = checks.checked_number(
        config.kl_weight,
        "kl_weight",
        lambda v: v >= 0,
        "a finite number >= 0 (the paper used 1e-16 to 1e-6)",
    )
    plain["max_log_variance"] = None
    if config.max_log_variance is not None:
        plain["max_log_variance"] = checks.checked_number(
            config.max_log_variance,
            "max_log_variance",
            lambda v: v > 0,
            "a finite number > 0 (for example 10: the noise's standard "
            "deviation at most exp(5)) or None for no bound",
        )
    return plain


def _booleans(config):
    """`save_projection` and `sample_at_inference`, checked, as `bool`s."""
    return {
        name: checks.checked_boolean(getattr(config, name), name)
        for name in ("save_projection", "sample_at_inference")
    }


def _selectors(config):
    """`target` and `trainable_layers`, checked; a collection of names as a
    tuple."""
    plain = {}
    for name in SELECTOR_NAMES:
        value = getattr(config, name)
        _check_selector(name, value)
        if isinstance(value, (list, tuple, set)):
            value = tuple(value)
        plain[name] = value
    return plain


def _fused_groups(groups):
    """`fused_groups`, checked, as a tuple of tuples (empty: None)."""
    _check_fused_groups(groups)
    if groups is None:
        return None
    return tuple(tuple(group) for group in groups) or None


def _check_fused_groups(groups):
    if groups is None:
        return
    message = (
        "`fused_groups` must be None or a list of lists of at least two layer "
        "paths, each path in one group at most, for example "
        "[['block_0/attention/query', 'block_0/attention/key', "
        f"'block_0/attention/value']]. Received: fused_groups={groups!r}"
    )
    if isinstance(groups, (str, bytes)) or not isinstance(groups, (list, tuple)):
        raise ValueError(message)
    seen = set()
    for group in groups:
        if (
            isinstance(group, (str, bytes))
            or not isinstance(group, (list, tuple))
            or len(group) < 2
            or not all(isinstance(path, str) for path in group)
            or seen & set(group)
            or len(set(group)) != len(group)
        ):
            raise ValueError(message)
        seen.update(group)


def _check_selector(name, value):
    if value is None or callable(value) or isinstance(value, str):
        return
    if isinstance(value, (list, tuple, set)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise ValueError(
                f"`{name}` names must be strings. Received: {bad[0]!r} in "
                f"{name}={value!r}"
            )
        return
    raise ValueError(
        f"`{name}` must be a list of layer names, a regex string, a callable "
        f"`(layer) -> bool`, 'all' or None. Received: {name}={value!r}"
    )
