"""An adapter's mean as a change of the base kernel: folding and merging.

With sampling off, PVeRA's adapter is linear in the layer's input, so its
mean is one `(in, out)` matrix, laid out as the base kernel by the map:

    delta_W = A[:r, :in].T @ diag(lambda_d[:r]) @ B[:out, :].T
              @ diag(alpha * lambda_b)

Mean-mode inference on a float32 kernel folds it into the kernel once per
call (as Keras' own LoRA does), which costs one `in x r x out` product per
call instead of two per-token products; merging adds it to the kernel in
place (`merge`, `unmerge`), and `keras_pvera.merge` into a plain copy of
the base model. Every one of them reads the delta here (`delta_kernel`,
`merge_delta`).
"""

from keras import ops

from keras_pvera.src.layers.adapter_layer import as_names
from keras_pvera.src.utils import keras_internals


class KernelDelta:
    """Mixed into `PVeRADense`: adapters' means as kernel deltas.

    The layer provides `adapter_vectors`, `merged_names`, `active_names`,
    `linear` (its map), `base_layer` and `_vectors(name)` and
    `_projections(vectors)`.
    """

    def _unmerged(self, adapter_names=None):
        """Of `adapter_names` (`None`: the active adapters), those this layer
        holds and has not merged."""
        names = self.active_names if adapter_names is None else adapter_names
        return [
            n
            for n in as_names(names)
            if n in self.adapter_vectors and n not in self.merged_names
        ]

    def merge_delta(self, adapter_names=None):
        """What merging `adapter_names` would add to the kernel.

        Args:
            adapter_names: Names; `None` for the active adapters. Names
                already merged, or that this layer does not hold, are
                skipped.

        Returns:
            The sum of their `delta_kernel`s, or `None` when none is left.
        """
        delta = None
        for name in self._unmerged(adapter_names):
            kernel = self.delta_kernel(name)
            delta = kernel if delta is None else ops.add(delta, kernel)
        return delta

    def merge(self, adapter_names=None):
        """Folds adapters' mean into the kernel (PEFT's layer `merge`).

        Args:
            adapter_names: Names to merge; `None` for the active adapters.
                Names already merged, or that this layer does not hold, are
                skipped.

        Returns:
            The list of names merged by this call.
        """
        todo = self._unmerged(adapter_names)
        kernel = keras_internals.kernel_variable(self.base_layer)
        for name in todo:
            delta = ops.cast(self.delta_kernel(name), kernel.dtype)
            kernel.assign(ops.add(kernel, delta))
            self.merged_names = (*self.merged_names, name)
        return todo

    def unmerge(self):
        """Takes every merged adapter back out of the kernel, last first."""
        kernel = keras_internals.kernel_variable(self.base_layer)
        while self.merged_names:
            *rest, name = self.merged_names
            self.merged_names = tuple(rest)
            delta = ops.cast(self.delta_kernel(name), kernel.dtype)
            kernel.assign(ops.subtract(kernel, delta))

    def _scaled_b(self, b, vectors):
        # (out, r) * (alpha * lambda_b) per row -> (r, out)
        scale = ops.multiply(vectors.config.alpha, vectors.lambda_b)
        return ops.transpose(ops.multiply(b, ops.expand_dims(scale, 1)))

    def mean_factors(self, adapter=None):
        """An adapter's mean as two rank-`r` factors: a LoRA.

        `down @ up` is the `(in, out)` matrix that the mean adapter adds to
        the layer's map: `down = A[:r, :in].T @ diag(lambda_d[:r])` and
        `up = B[:out, :].T @ diag(alpha * lambda_b)` (`B`'s rows from the
        adapter's `out_offset` in a fused group). In PyTorch's layout these
        are LoRA's `lora_A.weight = down.T` and `lora_B.weight = up.T`.

        Args:
            adapter: The adapter's name; `None` for the active one (the
                first, if several).

        Returns:
            A tuple `(down, up)` of tensors of shapes `(in, r)` and
            `(r, out)`.
        """
        vectors = self._vectors(adapter)
        a, b = self._projections(vectors)
        r = vectors.config.rank
        a_mean = ops.multiply(a[:r], ops.expand_dims(vectors.lambda_d[:r], 1))
        return ops.transpose(a_mean), self._scaled_b(b, vectors)

    def delta_kernel(self, adapter=None):
        """An adapter's mean as a kernel: what merging adds to it.

        Args:
            adapter: The adapter's name; `None` for the active one (the
                first, if several).

        Returns:
            A tensor of the base layer's kernel shape.
        """
        down, up = self.mean_factors(adapter)
        return self.linear.kernel(ops.matmul(down, up))

    def _folded_path(self, inputs, names=None):
        """Mean-mode inference: the adapters (`None`: the active ones)
        folded into the kernel, once a call."""
        names = self.active_names if names is None else names
        return self._with_kernel(inputs, names, ops.add)

    def _with_kernel(self, inputs, names, combine):
        """Mean-mode inference with the adapters `names` added to (or taken
        from) the kernel, once a call."""
        base = self.base_layer
        kernel = self.base_kernel
        for name in names:
            kernel = combine(kernel, self.delta_kernel(name))
        y = self.linear(inputs, kernel)
        bias = getattr(base, "bias", None)
        if bias is not None:
            y = self.linear.add_bias(y, bias)
        return y

    @property
    def base_kernel(self):
        """The base layer's kernel (an Embedding's matrix) as it computes
        with it, Keras' LoRA included."""
        return self.base_layer.kernel
