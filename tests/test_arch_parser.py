"""The safe ARCH parser of ``infnets kernel``: layer calls and literals, nothing else."""

from __future__ import annotations

import pytest
import torch

from infnets import stax
from infnets._src.app.arch_parser import ArchError, parse_arch, read_arch


def _same(a: object, b: object) -> bool:
    return repr(a) == repr(b)


@pytest.mark.parametrize(
    "text",
    [
        "serial(Dense(512, W_std=1.4, b_std=0.05), Relu(), Dense(1))",
        "stax.serial(stax.Dense(512, W_std=1.4, b_std=0.05), stax.Relu(), stax.Dense(1))",
        "infnets.stax.serial(Dense(512, W_std=1.4, b_std=0.05), stax.Relu(), Dense(1))",
        "serial(\n  Dense(512, W_std=+1.4, b_std=5e-2),  # hidden\n  Relu(),\n  Dense(1,),\n)",
    ],
)
def test_parses_what_a_user_writes(text: str) -> None:
    ref = stax.serial(stax.Dense(512, W_std=1.4, b_std=0.05), stax.Relu(), stax.Dense(1))
    net = parse_arch(text)
    assert _same(net, ref)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(net.kernel_fn(x, None, "ntk"), ref.kernel_fn(x, None, "ntk"))


def test_literals_and_nesting() -> None:
    net = parse_arch(
        "serial(Dense(8, parameterization='standard', b_std=None), LeakyRelu(-0.1), "
        "FanOut(2), parallel(Dense(4), serial(Identity(), Dense(4))), FanInSum(), "
        "Polynomial([1.0, -2, 0.5]), Dense(1, W_std=2))"
    )
    ref = stax.serial(
        stax.Dense(8, parameterization="standard", b_std=None),
        stax.LeakyRelu(-0.1),
        stax.FanOut(2),
        stax.parallel(stax.Dense(4), stax.serial(stax.Identity(), stax.Dense(4))),
        stax.FanInSum(),
        stax.Polynomial([1.0, -2, 0.5]),
        stax.Dense(1, W_std=2),
    )
    assert _same(net, ref)


def test_read_arch_from_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "arch.txt"
    f.write_text("serial(Dense(16), Erf())\n")
    ref = stax.serial(stax.Dense(16), stax.Erf())
    assert _same(read_arch(f"@{f}"), ref)
    assert _same(read_arch(str(f)), ref)
    assert _same(read_arch("serial(Dense(16), Erf())"), ref)
    with pytest.raises(ArchError, match="does not exist"):
        read_arch(f"@{tmp_path / 'missing.txt'}")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("__import__('os')", "not a layer"),
        ("__import__('os').system('true')", "only layer names"),
        ("os.system('true')", "attribute access"),
        ("serial(Dense(1), os.system)", "attribute access"),
        ("stax.os.system('true')", "attribute access"),
        ("Dense(1).__class__", "must be a layer call"),
        ("serial(Dense(1).__class__)", "attribute access"),
        ("Dense(1)(2)", "only layer names"),
        ("serial(lambda: 0)", "lambdas"),
        ("serial(*[Dense(1)])", "starred"),
        ("Dense(**{'out_dim': 1})", r"\*\* keyword"),
        ("serial([Dense(1) for _ in range(2)])", "comprehensions"),
        ("serial((Dense(1) for _ in range(2)))", "generator"),
        ("Dense(2 ** 100)", "arithmetic"),
        ("Dense(1 + 1)", "arithmetic"),
        ("Dense(-(1))", "rejected its arguments"),  # the AST of -(1) is -1
        ("Dense(-x)", "sign"),
        ("Dense(x)", "unknown name"),
        ("Dense(True if 1 else 2)", "conditional"),
        ("Dense(1, W_std=[1][0])", "subscripts"),
        ("Dense(f'{1}')", "f-strings"),
        ("Dense({'a': 1})", "dict"),
        ("Dense(b'1')", "bytes"),
        ("Dense(1j)", "complex"),
        ("Dense(...)", "ellipsis"),
        ("eval('1')", "not a layer"),
        ("getattr(stax, 'Dense')(1)", "only layer names"),
        ("open('/etc/passwd')", "not a layer"),
        ("Kernel(1)", "not a layer"),
        ("StaxModule()", "not a layer"),
        ("Relu", "must be a layer call"),
        ("serial(Relu)", "must be called"),
        ("1", "must be a layer call"),
        ("Dense(1); import os", "not a Python expression"),
        ("Dense(1, W_std=1, W_std=2)", "not a Python expression|twice"),
        ("Dense((yield))", "not a Python expression|yield|not allowed"),
        ("Dense(1, W_std=-1.5)", "rejected its arguments"),
        ("Dense(0)", "rejected its arguments"),
        ("Dense(1, W_std=1e400)", "rejected its arguments"),
        ("Dense(1, nonsense=2)", "rejected its arguments"),
        ("", "empty"),
    ],
)
def test_refuses_everything_but_layer_calls_and_literals(text: str, why: str) -> None:
    with pytest.raises(ArchError, match=why):
        parse_arch(text)


def test_refuses_deep_nesting_and_huge_text() -> None:
    with pytest.raises(ArchError, match="nested|malformed"):
        parse_arch("serial(" * 200 + "Relu()" + ")" * 200)
    with pytest.raises(ArchError, match="longer than"):
        parse_arch("serial(" + "Relu(), " * 20_000 + ")")
    with pytest.raises(TypeError):
        parse_arch(123)  # type: ignore[arg-type]


def test_never_evaluates(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import builtins

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    assert _same(parse_arch("serial(Dense(3), Relu())"), stax.serial(stax.Dense(3), stax.Relu()))
    with pytest.raises(ArchError):
        parse_arch("__import__('os').system('echo pwned')")
