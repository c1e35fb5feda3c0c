"""The command line and the demo: everything a user runs rather than imports.

* :mod:`.cli_kernel` (``infnets kernel``), :mod:`.arch_parser` (architectures from text,
  parsed with ``ast`` and a whitelist), :mod:`.cli_demo` (``infnets demo``);
* :mod:`.demo`, :mod:`.demo_data`, :mod:`.demo_train`: the guided tour's experiments.

May import: anything below it, and the public modules.
"""
