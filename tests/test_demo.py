"""Tests of ``infnets demo``: the quick run end to end, its figures and its numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from infnets import predict, stax
from infnets._src.app import demo, demo_data, demo_train
from infnets.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run ``infnets demo --quick`` once for the module; its folder, results and output."""
    pytest.importorskip("matplotlib")
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    with open(out / "results.json") as fh:
        results = json.load(fh)
    return status, out, results, buf.getvalue()


def test_quick_demo_runs_and_writes_figures(quick_run):
    from matplotlib.image import imread

    status, out, results, text = quick_run
    assert status == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["dynamics.png", "kernel_heatmap.png", "regression.png"]
    for name in names:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        img = imread(path)
        assert img.ndim == 3 and min(img.shape[:2]) > 200
    assert sorted(results["figures"]) == sorted(str(out / n) for n in names)
    assert str(out.resolve()) in text
    assert results["quick"] is True


def test_quick_demo_accuracies_above_chance(quick_run):
    _, _, results, text = quick_run
    dg = results["digits"]
    assert dg["chance"] < 0.15
    rows = {r["architecture"]: r for r in dg["rows"]}
    assert rows["FC"]["available"]
    if hasattr(stax, "Conv"):
        assert rows["CNN"]["available"]
    for row in rows.values():
        if not row["available"]:
            continue
        assert row["nngp"] > 0.85 and row["ntk"] > 0.85  # chance is 0.1
        assert row["finite"] > 0.5
        # every printed accuracy is the computed one
        assert f"{row['nngp']:11.3f}{row['ntk']:11.3f}" in text


def test_quick_demo_dynamics_and_regression(quick_run):
    _, _, results, text = quick_run
    dyn = results["dynamics"]
    assert [r["width"] for r in dyn["widths"]] == [64, 256, 1024, 4096]
    inf = dyn["infinite_loss"]
    assert inf[-1] < 0.2 * inf[0]  # training reduces the expected test loss
    dist = {r["width"]: r["distance_to_infinite_max"] for r in dyn["widths"]}
    assert dist[4096] < 0.5 * dist[64]  # finite width approaches infinite width
    assert dyn["distance_slope"] < -0.2
    for r in dyn["widths"]:
        assert math.isfinite(r["final_loss_mean"])
        assert r["final_loss_mean"] < 4 * dyn["infinite_final_loss"]
    reg = results["regression"]["metrics"]
    for g in ("nngp", "ntk"):
        assert reg[g]["rmse_in_range"] < 0.4
        assert reg[g]["mean_std_outside"] > reg[g]["mean_std_in_range"]  # wider off the data
    assert f"{reg['nngp']['rmse_in_range']:13.3f}" in text
    corr = results["heatmap"]["correlations"]["FC"]
    assert corr["within_class_correlation"] > corr["between_class_correlation"]


def test_demo_help_and_config(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
    full, quick = demo.DemoConfig.make(False), demo.DemoConfig.make(True)
    assert full.widths == quick.widths == (64, 256, 1024, 4096)
    assert quick.digits_train < full.digits_train


def test_linearized_gradient_descent_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    ntk = a @ a.T + torch.eye(6, dtype=torch.float64)
    kx = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    f0, fx0 = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.zeros(3, 2)
    lr = 0.5 / float(torch.linalg.eigvalsh(ntk)[-1])
    out = demo_train.linearized_gradient_descent(ntk, kx, y, lr, [0, 1, 7], f0, fx0)
    f, fx = f0.clone(), fx0.double().clone()
    expected = [fx.clone()]
    for step in range(7):
        residual = f - y
        f, fx = f - lr * ntk @ residual, fx - lr * kx @ residual
        if step in (0, 6):
            expected.append(fx.clone())
    torch.testing.assert_close(out, torch.stack(expected))
    # small steps approach predict's gradient flow
    flow = predict.gradient_descent_mse(ntk, y, lr)(torch.tensor([7.0]), f0, fx0, kx)[1]
    slow = demo_train.linearized_gradient_descent(ntk, kx, y, lr / 100, [700], f0, fx0)
    torch.testing.assert_close(slow, flow, rtol=1e-2, atol=1e-2)


def test_wider_networks_follow_their_linearization_closer():
    data = demo_data.regression_1d(8, seed=1)
    kernel_fn = demo.dynamics_net(1).kernel_fn
    ntk = kernel_fn(data.x_train, None, "ntk")
    lr = 0.05 * predict.max_learning_rate(ntk)
    x_test = torch.linspace(-3, 3, 10, dtype=torch.float64)[:, None]
    ntk_test = kernel_fn(x_test, data.x_train, "ntk")
    gaps = {}
    for width in (16, 2048):
        with demo_train.single_thread():
            fx0, fx = demo_train.gradient_descent_ensemble(
                demo.dynamics_net(width), data.x_train, data.y_train, x_test, lr, [0, 30], [0, 1, 2]
            )
        lin = demo_train.linearized_gradient_descent(
            ntk, ntk_test, data.y_train.repeat(1, 3), lr, [0, 30], fx0[..., 0].T, fx[:, 0, :, 0].T
        )
        assert (fx[:, 1] - fx[:, 0]).abs().max() > 0.1  # it did train
        gaps[width] = float((fx[..., 0].permute(1, 2, 0) - lin).abs().mean())
    assert gaps[2048] < 0.02
    assert gaps[2048] < 0.5 * gaps[16]
