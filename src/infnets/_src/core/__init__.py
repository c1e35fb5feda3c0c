"""The foundations every other family builds on: the kernel record, the layer protocol, validation.

* :mod:`.kernel`: the immutable :class:`~infnets.Kernel` record, its pair layouts (dense,
  packed) and spatial layouts (full pixel pairs, diagonal);
* :mod:`.protocol`: :class:`~.protocol.KernelLayer`, what evaluation may ask of a layer
  (``init``/``apply``/``kernel``, spatial requirements, fused steps), and the raw-input kernel;
* :mod:`.inputs`: shared argument checks; :mod:`.safe_math`: numerically safe primitives.

May import: torch, numpy, scipy and nothing else of infnets.
"""
