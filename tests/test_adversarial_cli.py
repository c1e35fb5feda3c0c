"""Adversarial arguments of ``infnets kernel`` and ``infnets demo`` (issue #16).

Every refusal exits 2 with a message naming the option, before any tile runs or any store
is created (the store path must not exist afterwards).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zarr", reason="the distributed extra (zarr) is not installed")
pytest.importorskip("dask.array", reason="the distributed extra (dask) is not installed")

from infnets.cli import main  # noqa: E402

ARCH = "serial(Dense(16), Relu(), Dense(1))"


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((6, 4)))
    np.save(tmp_path / "img.npy", rng.standard_normal((6, 2, 5, 5)))
    np.savetxt(tmp_path / "x.csv", rng.standard_normal((6, 4)), delimiter=",")
    return tmp_path


def _kernel(data: Path, *extra: str, x1: str = "x.npy", out: str = "K.zarr") -> list[str]:
    return [
        "kernel",
        "--arch",
        ARCH,
        "--x1",
        str(data / x1),
        "--out",
        str(data / out),
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--device", "gpu"), "--device"),
        (("--device", "cuda:99"), "--device"),
        (("--torch-threads", "0"), "--torch-threads"),
        (("--tile", "0"), "--tile"),
        (("--workers", "-1"), "--workers"),
    ],
    ids=["device-name", "device-index", "threads", "tile", "workers"],
)
def test_bad_options_exit_2_before_any_store(data: Path, capsys, extra, match: str) -> None:
    assert main(_kernel(data, *extra)) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (data / "K.zarr").exists()


def test_unwritable_out_and_summary_exit_2(data: Path, capsys) -> None:
    (data / "file").write_text("not a folder")
    assert main(_kernel(data, out="file/K.zarr")) == 2
    assert "--out" in capsys.readouterr().err
    assert main(_kernel(data, out="file")) == 2  # an existing file is not a store
    assert "--out" in capsys.readouterr().err
    assert main(_kernel(data, "--summary", str(data))) == 2  # a folder is not a file
    assert "--summary" in capsys.readouterr().err
    assert main(_kernel(data, "--summary", str(data / "file" / "s.json"))) == 2
    assert "--summary" in capsys.readouterr().err
    assert not (data / "K.zarr").exists()
    if os.geteuid() != 0:  # root ignores permissions
        ro = data / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert main(_kernel(data, out="ro/K.zarr")) == 2
            assert "not writable" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)


def test_input_shape_against_architecture_exit_2_before_any_store(data: Path, capsys) -> None:
    # images into a Dense network: refused on the first example, no store is created
    assert main(_kernel(data, x1="img.npy")) == 2
    err = capsys.readouterr().err
    assert "--arch does not accept inputs of shape (2, 5, 5)" in err and "Traceback" not in err
    assert not (data / "K.zarr").exists()


def test_csv_input_gets_a_format_message(data: Path, capsys) -> None:
    assert main(_kernel(data, x1="x.csv")) == 2
    err = capsys.readouterr().err
    assert "--x1" in err and ".npy" in err and "csv" in err and "pickle" not in err


def test_tile_is_capped_at_n(data: Path, capsys) -> None:
    summary = data / "s.json"
    assert main(_kernel(data, "--tile", "4096", "--get", "nngp", "--summary", str(summary))) == 0
    assert "using --tile 6" in capsys.readouterr().out
    import json

    assert json.loads(summary.read_text())["tile"] == 6


def test_cluster_closing_mid_run_says_rerun(data: Path, monkeypatch, capsys) -> None:
    # a cluster that goes away surfaces as an error from the futures machinery itself
    # (not from a tile): the same "kept, rerun to resume" message, exit 1
    from infnets._src.scale import store as store_mod

    class Gone(OSError):
        pass

    def closed(self, futures):  # noqa: ANN001 - stands in for _ThreadExecutor.as_completed
        raise Gone("scheduler closed the connection")

    monkeypatch.setattr(store_mod._ThreadExecutor, "as_completed", closed)
    assert main(_kernel(data, "--get", "nngp", "--tile", "2")) == 1
    err = capsys.readouterr().err
    assert "Gone: scheduler closed the connection" in err and "rerun to resume" in err


def test_demo_unwritable_out(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path / "file" / "demo")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "writable" in err and "Traceback" not in err
