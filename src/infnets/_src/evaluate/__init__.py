"""Kernel evaluation: from ``kernel_fn(x1, x2, get)`` to the layers' kernel maps, in budget.

* :mod:`.tiling`: the entry point behind every ``kernel_fn``: input checks, spatial planning,
  memory-budgeted tiles on a thread pool, assembly of the output;
* :mod:`.input_kernels`: the first record, the kernel of raw inputs;
* :mod:`.chunks`: the fully-connected fast path (blocks of pairs, plans fused from the layers'
  declared :class:`~infnets._src.core.protocol.Affine`/``PairMap`` steps) and heap tuning;
* :mod:`.compiled`: TorchInductor kernels for large convolutional covariances.

May import: :mod:`infnets._src.core`. Layers are seen only through the protocol
(:class:`~infnets._src.core.protocol.KernelLayer`), never as concrete classes.
"""
