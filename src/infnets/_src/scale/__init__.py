"""Kernels and solves at scale: tiles, resumable stores, Dask clusters, out-of-core solvers.

* :mod:`.tiles`: the tile grid and the computation of one tile;
* :mod:`.store`: zarr stores written atomically tile by tile (resumable);
* :mod:`.cluster`: Dask clients and graphs; :mod:`.solve`: solvers on stored kernels.

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`, :mod:`infnets._src.layers`,
:mod:`infnets._src.predict`.
"""
