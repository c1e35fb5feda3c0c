r"""Multi-head self-attention over all positions, and its infinite-width kernels.

Theory: Hron, Bahri, Sohl-Dickstein, Novak 2020, "Infinite attention: NNGP and NTK for
deep attention networks" (ICML 2020, arXiv 2006.10540). Argument names and meanings
follow Neural Tangents' ``stax.GlobalSelfAttention`` so that ported code gives the
same kernels; activations are channels-first, ``(N, C, *spatial)``, and attention
runs over all ``P = prod(spatial)`` positions (sequences ``(N, C, L)``, images
``(N, C, H, W)``).

The finite layer (NTK parameterization, ``H`` heads, key width ``d_k``, value width
``d_v``; ``x_k``/``x_v`` the key and value inputs of ``C_k``/``C_v`` channels, i.e. the
input with or without the positional embeddings ``e``)::

    G_h = s_QK / (C_k d_k^a) (x_k WQ_h)(x_k WK_h)^T        (P x P logits per head)
    y   = s_OV / sqrt(H d_v C_v) concat_h[m(G_h) x_v WV_h] W_out + b_std b

with ``s_QK = W_query_std W_key_std``, ``s_OV = W_out_std W_value_std`` and ``m`` the
attention mechanism (softmax over the keys, identity, abs or ReLU). With
``linear_scaling=True`` (``a = 1``) the queries share the key weights (``WQ = WK``): the
logits converge to the constant ``s_QK K_k(x, x)``, the key covariance of the example,
and the layer is a deterministic attention matrix ``A_x = m(s_QK K_k(x, x))`` applied to
Gaussian values (Hron et al. 2020, sec. 3.1):

* ``K'(x, y) = s_OV^2 A_x V(x, y) A_y^T + b_std^2`` (``P x P`` per pair of examples);
* ``Theta'(x, y) = s_OV^2 A_x [Theta_v(x, y) + 2 V(x, y)] A_y^T + b_std^2`` (the values'
  NTK, plus the value and output weights; the key/query weights and the layers before
  them reach the output only through the constant logits and contribute nothing).

With ``linear_scaling=False`` (``a = 1/2``, standard attention, independent ``WQ``,
``WK``) the logits stay random: in the many-heads, wide-keys limit they are Gaussian with
``Cov(G_x(p, p'), G_y(q, q')) = s_QK^2 K_k(x, y)(p, q) K_k(x, y)(p', q')`` (sec. 3.2), and
``K'(x, y)(p, q) = s_OV^2 E[m(G_x)(p, :) V(x, y) m(G_y)(q, :)^T] + b_std^2``. For the
identity mechanism the expectation is a closed form; for the others it is computed by
quasi-Monte Carlo (:mod:`infnets._src.attention.qmc`).

Positional embeddings ``e`` (``pos_emb_type='SUM'`` or ``'CONCAT'``) are random, shared by
all examples, with covariance ``R(p, p') = decay(sum_a |p_a - p'_a|^pos_emb_p_norm)``
(``R = I`` without ``pos_emb_decay_fn``) and standard deviation ``W_pos_emb_std``; they
turn the key covariance into ``K_k = w_x K + w_e R`` with ``(w_x, w_e) = (1, s_e^2)`` for
``'SUM'`` and ``(C / (C + C_e), s_e^2 C_e / (C + C_e))`` for ``'CONCAT'`` (NTK: ``w_x
Theta + w_e R``: the embeddings are trained). ``val_pos_emb=True`` also feeds them to
the values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from infnets._src.attention.maps import mechanism_fn, pos_emb_covariance, sqrt_psd
from infnets._src.core import inputs as _inputs
from infnets._src.core import masking
from infnets._src.core.protocol import ShapeTree
from infnets._src.layers.base import Layer, Params

__all__ = ["GlobalSelfAttention", "MECHANISMS", "POS_EMB_TYPES", "pos_emb_covariance"]

MECHANISMS = ("SOFTMAX", "IDENTITY", "ABS", "RELU")
POS_EMB_TYPES = ("NONE", "SUM", "CONCAT")


# ------------------------------------------------------------------ helpers
def _choice(value: Any, allowed: tuple[str, ...], name: str) -> str:
    if not isinstance(value, str) or value.upper() not in allowed:
        raise ValueError(f"GlobalSelfAttention: {name} must be one of {allowed}, got {value!r}.")
    return value.upper()


# -------------------------------------------------------------------- layer
@dataclasses.dataclass(frozen=True, eq=False)
class GlobalSelfAttention(Layer):
    r"""Multi-head (global) self-attention over all positions, NNGP and NTK at infinite width.

    Activations are ``(N, C, *spatial)``; every position attends to every (real)
    position. Infinite width means infinitely many channels, heads, key and value
    dimensions (Hron et al. 2020, arXiv 2006.10540); the finite layer and the two
    regimes are described in :mod:`infnets._src.attention.layer`:

    * ``linear_scaling=True`` (Neural Tangents' default): logits scaled by
      ``1 / d_k`` with tied query/key weights; exact closed-form kernels for every
      mechanism and positional embedding:
      ``K' = s_OV^2 A_x V A_y^T + b^2``, ``Theta' = s_OV^2 A_x (Theta_v + 2 V) A_y^T + b^2``
      with ``A_x = m(s_QK K_k(x, x))``, ``s_QK = W_query_std W_key_std``,
      ``s_OV = W_out_std W_value_std``.
    * ``linear_scaling=False``: standard ``1 / sqrt(d_k)`` attention with separate
      queries and keys. ``'IDENTITY'``: exact closed form,
      ``K'(p, q) = s^2 K_k(p, q) <K_k, V> + b^2`` (``s = s_QK s_OV``, ``<,>`` the sum over
      all position pairs). Other mechanisms (beyond Neural Tangents, which refuses
      them): the Gaussian expectation over the logits is computed by scrambled Sobol
      quasi-Monte Carlo with ``n_samples`` points and a fixed ``seed``. The estimate is
      deterministic; its error, measured against ``65536`` points, is about 1 % of the
      kernel's scale at ``n_samples=1024``, 0.5 % at 4096 and 0.1 % at 16384 (roughly
      ``n_samples^(-0.6..-1)``). Cost ``O(N1 N2 P^4 n_samples)`` for the NTK
      (``O(N1 N2 P^3 n_samples)`` for the NNGP alone); symmetric problems are averaged
      with their mirror, so the kernel matrix is exactly symmetric.

    Relation to ``torch.nn.MultiheadAttention``: ``nn.MultiheadAttention(E, H)`` with
    ``d_k = d_v = E / H``, in-projections for queries, keys and values, ``1/sqrt(d_k)``
    scaling, softmax and an output projection is ``linear_scaling=False,
    attention_mechanism='SOFTMAX'`` with ``n_chan_key = n_chan_val = E / H``, up to the
    NTK parameterization (weights ``N(0, 1)`` scaled in the forward pass by
    ``W_std / sqrt(fan_in)``), the absence of in-projection biases, and the fan-in
    ``C_k d_k`` (not ``d_k``) of the logits' normalisation. With ``linear_scaling=True``
    the queries *are* the keys (one tied ``W_key``; ``W_query_std`` only scales) and
    logits are divided by ``d_k`` (Hron et al. 2020, sec. 3.1). Parameters:
    ``W_key`` (``(H, C_k, d_k)``), ``W_query`` (same, ``linear_scaling=False`` only),
    ``W_value`` (``(H, C_v, d_v)``), ``W_out`` (``(n_chan_out, H d_v)``), ``b``
    (``(n_chan_out,)``, when ``b_std`` is not ``None``) and the trainable embeddings
    ``pos_emb`` (``(C_e, *spatial)``).

    Only the NTK parameterization exists (as in Neural Tangents): the weights are
    ``N(0, 1)`` and the standard deviations scale the forward pass.

    Masks (``mask_constant``, see :mod:`infnets._src.core.masking`): padded positions are
    excluded as keys (zero attention weight) and the output at padded positions is
    zero (kernel entries involving them too), so a padded sequence has the kernel of
    the unpadded one downstream of masked pooling.

    Args:
        n_chan_out: output channels.
        n_chan_key: key/query dimension ``d_k`` per head.
        n_chan_val: value dimension ``d_v`` per head.
        n_heads: number of heads ``H``.
        linear_scaling: ``True``: tied keys/queries, logits ``/ (C_k d_k)``; ``False``:
            independent, logits ``/ (C_k sqrt(d_k))``.
        W_key_std, W_query_std: weight scales; only their product ``s_QK`` matters.
        W_value_std, W_out_std: weight scales; only their product ``s_OV`` matters.
        b_std: output bias scale (``None``: no bias parameter).
        attention_mechanism: ``'SOFTMAX'`` (over keys), ``'IDENTITY'``, ``'ABS'`` or ``'RELU'``.
        pos_emb_type: ``'NONE'``, ``'SUM'`` (added to the input) or ``'CONCAT'``
            (concatenated along the channels).
        pos_emb_p_norm: ``p`` of the distance ``sum_a |p_a - p'_a|^p`` fed to ``pos_emb_decay_fn``.
        pos_emb_decay_fn: elementwise map of that distance matrix (a torch tensor) to the
            embeddings' covariance, e.g. ``lambda d: 0.5 ** d``; ``None``: independent
            embeddings (identity covariance).
        n_chan_pos_emb: embedding channels ``C_e`` for ``'CONCAT'`` (``None``: ``C``);
            refused for ``'SUM'`` (the embeddings then have the input's channels).
        W_pos_emb_std: standard deviation of the embeddings.
        val_pos_emb: also use the embeddings in the values.
        n_samples: quasi-Monte Carlo points (``linear_scaling=False``, non-identity
            mechanisms); a power of 2 is best.
        seed: seed of the Sobol scrambling (the estimate is deterministic).

    Examples:
        >>> from infnets import stax
        >>> net = stax.serial(stax.Conv(16, (1,)), stax.GlobalSelfAttention(16, 16, 16, 4),
        ...                   stax.GlobalAvgPool(), stax.Dense(1))
        >>> x = torch.randn(3, 2, 5, dtype=torch.float64)
        >>> net.kernel_fn(x, None, 'ntk').shape
        torch.Size([3, 3])
        >>> _, params = net.init_fn(0, x.shape, dtype=torch.float64)
        >>> net.apply_fn(params, x).shape
        torch.Size([3, 1])
    """

    n_chan_out: int
    n_chan_key: int
    n_chan_val: int
    n_heads: int
    linear_scaling: bool = True
    W_key_std: float = 1.0
    W_value_std: float = 1.0
    W_query_std: float = 1.0
    W_out_std: float = 1.0
    b_std: float | None = None
    attention_mechanism: str = "SOFTMAX"
    pos_emb_type: str = "NONE"
    pos_emb_p_norm: float = 2
    pos_emb_decay_fn: Callable[[Any], Any] | None = None
    n_chan_pos_emb: int | None = None
    W_pos_emb_std: float = 1.0
    val_pos_emb: bool = False
    n_samples: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        who = "GlobalSelfAttention"
        for name in ("n_chan_out", "n_chan_key", "n_chan_val", "n_heads"):
            _inputs.check_int(getattr(self, name), f"{who}: {name}", 1)
        for name in ("W_key_std", "W_value_std", "W_query_std", "W_out_std", "W_pos_emb_std"):
            object.__setattr__(self, name, _inputs.check_std(getattr(self, name), f"{who}: {name}"))
        object.__setattr__(
            self, "b_std", _inputs.check_std(self.b_std, f"{who}: b_std", allow_none=True)
        )
        for name in ("linear_scaling", "val_pos_emb"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{who}: {name} must be True or False, got {getattr(self, name)!r}."
                )
        object.__setattr__(
            self,
            "attention_mechanism",
            _choice(self.attention_mechanism, MECHANISMS, "attention_mechanism"),
        )
        object.__setattr__(
            self, "pos_emb_type", _choice(self.pos_emb_type, POS_EMB_TYPES, "pos_emb_type")
        )
        if self.n_chan_pos_emb is not None:
            if self.pos_emb_type == "SUM":
                raise ValueError(
                    f"{who}: n_chan_pos_emb={self.n_chan_pos_emb} with pos_emb_type='SUM': summed "
                    "embeddings have the input's channels. Leave n_chan_pos_emb=None, or use "
                    "pos_emb_type='CONCAT' to choose their width."
                )
            _inputs.check_int(self.n_chan_pos_emb, f"{who}: n_chan_pos_emb", 1)
        if (
            isinstance(self.pos_emb_p_norm, bool)
            or not isinstance(self.pos_emb_p_norm, (int, float))
            or not self.pos_emb_p_norm > 0
        ):
            raise ValueError(
                f"{who}: pos_emb_p_norm must be a number > 0, got {self.pos_emb_p_norm!r}."
            )
        if self.pos_emb_decay_fn is not None and not callable(self.pos_emb_decay_fn):
            raise TypeError(f"{who}: pos_emb_decay_fn must be callable or None.")
        _inputs.check_int(self.n_samples, f"{who}: n_samples", 2)
        _inputs.check_int(self.seed, f"{who}: seed", 0)

    def __repr__(self) -> str:
        return (
            f"GlobalSelfAttention({self.n_chan_out}, {self.n_chan_key}, {self.n_chan_val}, "
            f"{self.n_heads}, linear_scaling={self.linear_scaling}, "
            f"attention_mechanism={self.attention_mechanism!r}, "
            f"pos_emb_type={self.pos_emb_type!r})"
        )

    # --------------------------------------------------------------- helpers
    @property
    def _has_pos_emb(self) -> bool:
        return self.pos_emb_type != "NONE"

    def _check_shape(self, shape: Any, what: str) -> tuple[int, ...]:
        if isinstance(shape, list):
            raise ValueError(f"{self!r} received {len(shape)} branches; join them first.")
        shape = tuple(shape)
        if len(shape) < 3:
            raise ValueError(
                f"{self!r} attends over positions and takes (N, C, *spatial) activations "
                f"(sequences (N, C, L), images (N, C, H, W)), but the {what} has shape {shape} "
                "without positions. Give sequences a length axis, e.g. x[:, :, None] "
                "for one position, or use Dense for fully-connected inputs."
            )
        return shape

    def _n_pos_emb(self, c: int) -> int:
        return c if self.n_chan_pos_emb is None else self.n_chan_pos_emb

    def _weights(self, c: int) -> tuple[float, float]:
        """Interpolation ``(w_x, w_e)`` of input and embedding covariances (keys)."""
        s2 = float(self.W_pos_emb_std) ** 2
        if self.pos_emb_type == "CONCAT":
            ce = self._n_pos_emb(c)
            return c / (c + ce), s2 * ce / (c + ce)
        return 1.0, s2

    # ----------------------------------------------------------------- finite
    def init(
        self, gen: torch.Generator, in_shape: ShapeTree, dtype: torch.dtype, device: torch.device
    ) -> tuple[ShapeTree, Params]:
        shape = self._check_shape(in_shape, "input shape")
        c = shape[1]
        if any(s <= 0 for s in shape[1:]):
            raise ValueError(f"{self!r}: input shape {shape} needs known channels and positions.")
        ce = self._n_pos_emb(c)
        c_k = c + ce if self.pos_emb_type == "CONCAT" else c
        c_v = c_k if self.val_pos_emb else c
        h, dk, dv = self.n_heads, self.n_chan_key, self.n_chan_val

        def rand(*s: int) -> Tensor:
            return torch.randn(s, generator=gen, dtype=dtype, device=device)

        params: dict[str, Tensor] = {"W_key": rand(h, c_k, dk)}
        if not self.linear_scaling:
            params["W_query"] = rand(h, c_k, dk)
        params["W_value"] = rand(h, c_v, dv)
        params["W_out"] = rand(self.n_chan_out, h * dv)
        if self.b_std is not None:
            params["b"] = rand(self.n_chan_out)
        if self._has_pos_emb:
            params["pos_emb"] = rand(ce, *shape[2:])
        return (shape[0], self.n_chan_out) + shape[2:], params

    def apply(self, params: Params, x: Any) -> Any:
        self._check_shape(x.shape if isinstance(x, Tensor) else x, "input")
        mask = masking.current_mask(x, repr(self))
        n, c = x.shape[0], x.shape[1]
        spatial = tuple(x.shape[2:])
        p = math.prod(spatial)
        xs = x.reshape(n, c, p)
        keep = None if mask is None else (~mask).reshape(n, 1, p).to(x.dtype)
        xk = xv = xs
        if self._has_pos_emb:
            e = params["pos_emb"]
            if tuple(e.shape[1:]) != spatial:
                raise ValueError(
                    f"{self!r}: positional embeddings were initialised for positions "
                    f"{tuple(e.shape[1:])} but the input has {spatial}; init with that shape."
                )
            e = e.reshape(e.shape[0], p)
            if self.pos_emb_decay_fn is not None:
                r = pos_emb_covariance(
                    spatial, self.pos_emb_p_norm, self.pos_emb_decay_fn, x.dtype, x.device
                )
                e = e @ sqrt_psd(r).T  # covariance R across positions
            e = (e * self.W_pos_emb_std).expand(n, -1, -1)
            if keep is not None:
                e = e * keep
            if self.pos_emb_type == "SUM":
                if e.shape[1] != c:
                    raise ValueError(
                        f"{self!r}: summed positional embeddings have {e.shape[1]} channels "
                        f"but the input has {c}; initialise with the input's shape."
                    )
                xk = xs + e
            else:
                xk = torch.cat([xs, e], dim=1)
            if self.val_pos_emb:
                xv = xk
        c_k, c_v = xk.shape[1], xv.shape[1]
        wk = params["W_key"]
        keys = torch.einsum("ncp,hcd->nhpd", xk, wk)
        queries = (
            keys if self.linear_scaling else torch.einsum("ncp,hcd->nhpd", xk, params["W_query"])
        )
        dk = wk.shape[-1]
        norm = c_k * (dk if self.linear_scaling else math.sqrt(dk))
        g = queries @ keys.transpose(-1, -2) * (self.W_key_std * self.W_query_std / norm)
        a = mechanism_fn(
            self.attention_mechanism, g, None if keep is None else keep.unsqueeze(1)
        )  # (N, H, P, P)
        vals = torch.einsum("ncp,hcd->nhpd", xv, params["W_value"])
        heads = (a @ vals).permute(0, 2, 1, 3).reshape(n, p, -1)  # (N, P, H d_v)
        w_out = params["W_out"]
        scale = self.W_out_std * self.W_value_std / math.sqrt(heads.shape[-1] * c_v)
        y = (heads @ w_out.T) * scale
        if "b" in params:
            y = y + self.b_std * params["b"]
        if keep is not None:
            y = y * keep.reshape(n, p, 1)
        return y.transpose(1, 2).reshape((n, self.n_chan_out) + spatial)

    # --------------------------------------------------------------- infinite
    def spatial_requirement(self, out_full: Any) -> Any:
        return True

    def kernel(self, k: Any) -> Any:
        from infnets._src.attention.kernel import attention_kernel

        if isinstance(k, list):
            raise ValueError(f"{self!r} received {len(k)} branches; join them first.")
        self._check_shape(k.shape1, "input")
        if k.diagonal_spatial:
            raise ValueError(
                f"{self!r} mixes all positions and needs the full spatial covariance (every "
                "pair of positions) of its input, but the record keeps only per-position "
                "covariances. Call kernel_fn with diagonal_spatial=None (automatic) or False."
            )
        if self.pos_emb_type == "SUM" and self.n_chan_pos_emb is not None:  # pragma: no cover
            raise ValueError(f"{self!r}: n_chan_pos_emb is refused with 'SUM'.")
        out = attention_kernel(self, k)
        shape = lambda s: (s[0], self.n_chan_out) + tuple(s[2:])  # noqa: E731
        out = out.replace(
            shape1=shape(k.shape1),
            shape2=shape(k.shape2),
            is_gaussian=True,
            last_affine=object(),
            centred=True,
        )
        return masking.remask(out)
