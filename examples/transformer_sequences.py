"""Transformer kernels on variable-length sequences, against trained finite transformers.

Task (synthetic): each sequence has 3 to 12 tokens, each a noisy one-hot vector over four
symbols plus a constant channel; the label is +1 when symbol 0 is more frequent than
symbol 1, else -1. Sequences are zero-padded to length 12 and the padding is marked with
``mask_constant=0.0``, so attention and mean pooling ignore it.

Architecture (kernel and finite network alike): a position-wise embedding
``Conv(W, (1,))``, one residual transformer encoder block (attention, residual,
LayerNorm, position-wise MLP, residual, LayerNorm), masked mean pooling, ``Dense(1)``.

* Kernels: NNGP and NTK regression (``infnets.predict.gp_inference``) of the +-1 labels;
  also the kernel computed without masks (padding treated as tokens).
* Finite: the same architecture at width 64 (``to_module``), trained with Adam on the
  squared loss, two seeds.

Run: ``python examples/transformer_sequences.py`` (about 20 s on 2 cores).
"""

from __future__ import annotations

import time

import torch

from infnets import predict, stax

LENGTH, SYMBOLS, N_TRAIN, N_TEST = 12, 4, 160, 200


def make_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, SYMBOLS + 1, LENGTH)`` zero-padded sequences and their +-1 labels ``(n, 1)``."""
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=gen)
    symbols = torch.randint(0, SYMBOLS, (n, LENGTH), generator=gen)
    x = torch.nn.functional.one_hot(symbols, SYMBOLS).double()
    x = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    x = torch.cat([x, torch.ones(n, LENGTH, 1, dtype=torch.float64)], dim=-1)
    real = torch.arange(LENGTH) < lengths[:, None]  # (n, L)
    x = (x * real[..., None]).transpose(1, 2).contiguous()  # (n, C, L), zero padding
    counts = torch.nn.functional.one_hot(symbols, SYMBOLS) * real[..., None]
    diff = counts[..., 0].sum(1) - counts[..., 1].sum(1)
    # ties broken at random, so that every label is a function of the sequence's counts
    y = torch.where(diff != 0, diff.sign(), torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    return x, y.double()[:, None]


def transformer(width: int, heads: int = 4) -> stax.Layer:
    block = stax.serial(
        stax.FanOut(2),
        stax.parallel(
            stax.GlobalSelfAttention(width, width, width // heads, heads, b_std=0.1),
            stax.Identity(),
        ),
        stax.FanInSum(),
        stax.LayerNorm(axis=1),
        stax.FanOut(2),
        stax.parallel(
            stax.serial(
                stax.Conv(width, (1,), b_std=0.1), stax.Relu(), stax.Conv(width, (1,), b_std=0.1)
            ),
            stax.Identity(),
        ),
        stax.FanInSum(),
        stax.LayerNorm(axis=1),
    )
    return stax.serial(
        stax.Conv(width, (1,), W_std=1.0, b_std=0.1), block, stax.GlobalAvgPool(), stax.Dense(1)
    )


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred.sign() == y).double().mean())


def kernel_accuracies(x_train, y_train, x_test, y_test, masked: bool) -> dict[str, float]:
    kernel_fn = transformer(64).kernel_fn
    opts = {"mask_constant": 0.0} if masked else {}
    k_tt = kernel_fn(x_train, None, ("nngp", "ntk"), **opts)
    k_st = kernel_fn(x_test, x_train, ("nngp", "ntk"), **opts)
    predict_fn = predict.gp_inference(k_tt, y_train, diag_reg=1e-3)
    return {g: accuracy(predict_fn(g, getattr(k_st, g)), y_test) for g in ("nngp", "ntk")}


def finite_accuracy(
    x_train, y_train, x_test, y_test, seed: int, width: int = 64, steps: int = 300
) -> float:
    torch.manual_seed(seed)
    model = transformer(width).to_module(
        x_train.shape, key=seed, dtype=torch.float32, mask_constant=0.0
    )
    xs, ys = x_train.float(), y_train.float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(xs) - ys).pow(2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return accuracy(model(x_test.float()).double(), y_test)


def main(steps: int = 300) -> None:
    """Print the accuracy table (``steps``: Adam steps of each finite transformer)."""
    # tiny tensors: one intra-op thread avoids OpenMP overhead (8x faster training on a
    # busy 2-core machine)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(N_TRAIN, gen)
    x_test, y_test = make_data(N_TEST, gen)
    t0 = time.perf_counter()
    rows = []
    masked = kernel_accuracies(x_train, y_train, x_test, y_test, masked=True)
    rows += [("NNGP (masked)", masked["nngp"]), ("NTK (masked)", masked["ntk"])]
    plain = kernel_accuracies(x_train, y_train, x_test, y_test, masked=False)
    rows += [("NNGP (padding as tokens)", plain["nngp"]), ("NTK (padding as tokens)", plain["ntk"])]
    t_kernel = time.perf_counter() - t0
    t0 = time.perf_counter()
    for seed in (0, 1):
        rows.append((f"finite, width 64, seed {seed}", finite_accuracy(
            x_train, y_train, x_test, y_test, seed, steps=steps)))  # fmt: skip
    t_finite = time.perf_counter() - t0
    print(f"{N_TRAIN} training / {N_TEST} test sequences of length 3-{LENGTH} (padded to {LENGTH})")
    print(f"{'model':32s} {'test accuracy':>13s}")
    for name, acc in rows:
        print(f"{name:32s} {acc:13.3f}")
    print(f"kernels {t_kernel:.1f} s, finite training {t_finite:.1f} s")


if __name__ == "__main__":
    main()
