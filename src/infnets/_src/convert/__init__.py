"""Conversion of existing PyTorch models into infnets layers (``stax.from_torch``).

* :mod:`.from_torch`: tracing with ``torch.fx``, the ``TorchGraph`` layer, ``params_from``;
* :mod:`.from_torch_registry`: the registry (torch op -> converter), the errors;
* :mod:`.from_torch_ops`: the converters of each supported module and function;
* :mod:`.from_torch_layers`: small layers only conversion needs (padding, scaling, affine).

May import: every layer family, :mod:`infnets._src.empirical` (to read a model's tensors).
"""
