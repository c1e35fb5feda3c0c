"""Approximate kernels for ``N`` beyond what an ``N x N`` matrix allows: random features.

* :mod:`.random`: random features of the NNGP and NTK of fully-connected networks, and
  regression on features without forming the kernel.

May import: :mod:`infnets._src.core`, :mod:`infnets._src.layers`, :mod:`infnets._src.elementwise`.
"""
