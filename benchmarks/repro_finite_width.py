"""Finite-width NNGP correction vs Monte Carlo over finite networks (Roberts, Yaida & Hanin 2022).

For a depth-3 MLP (3 hidden layers of width n) and three inputs, compares the Monte Carlo mean
of the empirical output kernel ``G = b^2 + W^2 phi(z^L) . phi(z^L) / n`` (``E[G] = E[f f^T]``)
over ``--samples`` random networks with the infinite-width NNGP ``K`` and with the corrected
``K + m / n`` of :func:`infnets.finite_width.finite_width_nngp`, at widths 32, 64, 128, 256.
Errors are the root-mean-square over the 6 distinct kernel entries, with the Monte Carlo
standard error for reference, and ``chi2 = sum (error / s.e.)^2`` over the 6 entries (about 6,
95% below 12.6, when a kernel is the true mean; large when it is biased). The samples are
Rao-Blackwellized: the last layer's expectation given the kernel of layer ``L`` is exact.

Run::

    python benchmarks/repro_finite_width.py                 # table + figure
    python benchmarks/repro_finite_width.py --samples 4000  # quick
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from infnets import plot, stax  # noqa: E402
from infnets.finite_width import finite_width_nngp  # noqa: E402

F64 = torch.float64
X = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.9]], dtype=F64) * math.sqrt(3)
CASES = {
    "relu (W_std=1.4, b_std=0.1)": (stax.Relu(), 1.4, 0.1),
    "erf (W_std=1.6, b_std=0.2)": (stax.Erf(), 1.6, 0.2),
}


def sample_kernels(act, depth, w, b, n, samples, seed, chunk=1000):
    """``(S, P, P)`` samples of ``E[G^{L+1} | G^L]`` for random width-``n`` networks."""
    g = torch.Generator().manual_seed(seed)
    d = X.shape[1]
    out = []
    for lo in range(0, samples, chunk):
        s = min(chunk, samples - lo)
        weights = torch.randn(s, n, d, generator=g, dtype=F64)
        bias = torch.randn(s, n, 1, generator=g, dtype=F64)
        z = w * torch.einsum("snd,pd->snp", weights, X) / math.sqrt(d) + b * bias
        for _ in range(depth - 2):
            weights = torch.randn(s, n, n, generator=g, dtype=F64)
            bias = torch.randn(s, n, 1, generator=g, dtype=F64)
            z = w * weights @ act.fn(z) / math.sqrt(n) + b * bias
        h = act.fn(z)
        gl = b * b + w * w * torch.einsum("snp,snq->spq", h, h) / n  # kernel of layer L
        # Rao-Blackwellized: E[G^{L+1} | G^L] = b^2 + w^2 <phi phi>_{G^L}, exactly, by the
        # layer's closed-form map: same mean as sampling layer L, smaller variance
        var = torch.diagonal(gl, dim1=-2, dim2=-1)
        out.append(b * b + w * w * act.nngp_map(gl, var[:, :, None], var[:, None, :]))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16000)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "figures"))
    args = parser.parse_args()
    iu = torch.triu_indices(3, 3)
    fig, axes = plot.figure(ncols=len(CASES), size=(5.0, 4.0))
    print(f"depth {args.depth}, {args.samples} networks per width, 3 inputs (6 entries)")
    print(
        "| case | width | RMS err infinite K | RMS err K + m/n | MC s.e. (RMS) | ratio | "
        "chi2 infinite | chi2 corrected |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for ax, (label, (act, w, b)) in zip(axes, CASES.items()):
        fw = finite_width_nngp(act, X, depth=args.depth, W_std=w, b_std=b)
        inf_err, cor_err, ses = [], [], []
        for n in args.widths:
            t0 = time.time()
            g = sample_kernels(act, args.depth, w, b, n, args.samples, seed=n)
            mean = g.mean(0)
            se = (g.std(0) / math.sqrt(g.shape[0]))[iu[0], iu[1]]
            e_inf = (fw.nngp - mean)[iu[0], iu[1]]
            e_cor = (fw.at(n) - mean)[iu[0], iu[1]]
            rms = [float(e.pow(2).mean().sqrt()) for e in (e_inf, e_cor, se)]
            chi2 = [float(((e / se) ** 2).sum()) for e in (e_inf, e_cor)]  # 6 d.o.f. if unbiased
            inf_err.append(rms[0])
            cor_err.append(rms[1])
            ses.append(rms[2])
            print(
                f"| {label} | {n} | {rms[0]:.2e} | {rms[1]:.2e} | {rms[2]:.1e} | "
                f"{rms[0] / rms[1]:.1f}x | {chi2[0]:.1f} | {chi2[1]:.1f} | "
                f"({time.time() - t0:.0f} s)"
            )
        ax.loglog(args.widths, inf_err, "o-", label="infinite-width NNGP")
        ax.loglog(args.widths, cor_err, "s-", label="NNGP + 1/n correction")
        ax.loglog(args.widths, ses, "k:", label="Monte Carlo s.e.")
        ax.set_xlabel("width n")
        ax.set_ylabel("RMS error of E[K]")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    path = plot.save(fig, os.path.join(args.out, "finite_width.png"))
    print("figure:", path)


if __name__ == "__main__":
    main()
