"""Private implementation of infnets, one subpackage per family (see ``docs/architecture.md``).

Imports point downwards only (no cycles, function-level imports included)::

    core  <-  evaluate  <-  layers  <-  spatial, elementwise  <-  app
    core  <-  predict, empirical  ;  evaluate, layers  <-  scale  <-  app

The public modules (:mod:`infnets.stax`, :mod:`infnets.predict`, :mod:`infnets.empirical`,
:mod:`infnets.distributed`, ...) re-export from here.
"""
