"""Adapters to other libraries' estimator protocols: scikit-learn (and what they share).

* :mod:`.architectures`: architectures given as layers, ``stax`` expressions or factories;
  canonical keys so equal architectures compare (and cache) as equal;
* :mod:`.cache`: the bounded kernel cache keyed by (architecture, kernel, data content) that
  makes grid searches evaluate each kernel once per (architecture, fold);
* :mod:`.sk_common`: input conversion and validation shared by the scikit-learn estimators;
* :mod:`.sk_svm`: ``NTKTransformer`` (precomputed kernels in pipelines) and ``NTKSVC``.

The public faces are :mod:`infnets.sklearn` (and :mod:`infnets.gpytorch`). Modules that need
scikit-learn import it at module level and are imported only by :mod:`infnets.sklearn`.

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`, :mod:`infnets._src.layers`,
:mod:`infnets._src.predict`, and :mod:`infnets._src.app.arch_parser` (the safe parser of
``stax`` expressions, which architectures given as text use).
"""
