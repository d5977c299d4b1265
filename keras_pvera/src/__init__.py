"""keras_pvera's implementation: private, and free to change.

Import from `keras_pvera` itself; the names it exports are the public API.
One folder per job, each importing only from the folders below it:

- `utils`: Keras internals read in one place, KerasHub task helpers.
- `layers`: `PVeRADense`, its math, configuration and shared projections.
- `surgery`: walking a model's layers, choosing targets, swapping them.
- `uncertainty`: Monte Carlo prediction, its statistics, metrics and
  temperature scaling.
- `models`: `PVeRAModel`, `apply` and the adapter lifecycle.
- `saving`: adapter files, their state, and merging into a plain model.
- `peft`: Hugging Face PEFT's adapter files.
"""
