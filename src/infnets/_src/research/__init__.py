"""Research tools: signal propagation, kernel diagnostics, finite-width corrections, training.

* :mod:`.criticality`: mean-field signal propagation (Poole et al. 2016; Schoenholz et al.
  2017): the variance and correlation maps, their fixed points, ``chi_1``, ``chi_c``, the depth
  scales and the order-to-chaos critical line of any elementwise nonlinearity;
* :mod:`.diagnostics`: spectra, effective ranks, condition numbers and centred kernel-target
  alignment of kernels, and their evolution over the depth of a ``serial`` network;
* :mod:`.finite_width`: the leading ``1/width`` correction to the NNGP of deep MLPs (the
  four-point vertex recursion of Roberts, Yaida & Hanin 2022);
* :mod:`.train`: full-batch gradient descent of finite twins, many seeds at once.

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`, :mod:`infnets._src.layers`,
:mod:`infnets._src.elementwise`, :mod:`infnets._src.predict`.
"""
