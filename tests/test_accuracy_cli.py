"""``python -m vmf_head accuracy``: its ground truth (Poisson integral) against mpmath.besseli and the
test suite's Debye expansion, and the command itself."""

import sys

import mpmath
import mpmath_truth as truth
import pytest

from vmf_head import accuracy


@pytest.mark.parametrize(
    "nu, x", [(0.0, 1e-8), (0.0, 0.32), (0.5, 3.0), (1.0, 1e8), (7.0, 1e-3), (127.0, 600.0), (499.5, 1e4), (127.0, 1e8)]
)
def test_poisson_truth_matches_besseli(nu, x):
    log_i, ratio = accuracy.poisson_log_bessel_and_ratio(nu, x)
    with mpmath.workdps(50):
        exact = mpmath.log(mpmath.besseli(nu, x))
        exact_ratio = mpmath.besseli(nu + 1, x) / mpmath.besseli(nu, x)
    assert truth.error(log_i, exact) < 1e-36
    assert truth.error(ratio, exact_ratio) < 1e-36


@pytest.mark.parametrize("nu, x", [(2047.0, 1e4), (4095.0, 3e4), (32767.0, 3.6e5), (32767.0, 1e7), (49999.0, 1e-8)])
def test_poisson_truth_matches_debye_where_besseli_struggles(nu, x):
    log_i, ratio = accuracy.poisson_log_bessel_and_ratio(nu, x)
    assert truth.error(log_i, truth.log_bessel_iv(nu, x)) < 1e-36
    assert truth.error(ratio, truth.bessel_ratio(nu, x)) < 1e-36


def test_truth_at_kappa_zero_is_the_closed_form():
    value, a = accuracy.truth(256, 0.0)
    assert truth.error(value, truth.log_normalizer(256, 0.0)) < 1e-38 and a == 0


def test_command_prints_the_table(capsys):
    rc = accuracy.main(["--p", "3", "64", "--per-decade", "1", "--jobs", "1", "--strict"])
    out = capsys.readouterr().out
    assert rc == 0  # --strict: all bounds met for these p
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "exact f64  at kappa" in line) + 2  # header, rule
    rows = [line.split("|") for line in lines[first : first + 2]]
    assert [r[0].strip() for r in rows] == ["3", "64"] and all(r[-1].strip() == "yes" for r in rows)
    assert "scipy inf/NaN at kappa" in out and "zero of log C_p" in out


def test_strict_exit_status_reports_a_missed_bound(monkeypatch):
    # a bound nothing can meet makes every row fail: --strict turns that into exit status 1
    monkeypatch.setattr(accuracy, "BOUND_F32", 0.0)
    argv = ["--p", "3", "--per-decade", "1", "--jobs", "1"]
    assert accuracy.main(argv) == 0 and accuracy.main([*argv, "--strict"]) == 1


def test_command_explains_missing_mpmath(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpmath", None)  # makes `import mpmath` raise ImportError
    assert accuracy.main([]) == 1
    assert "pip install 'vmf-head[accuracy]'" in capsys.readouterr().err


def test_registered_as_a_subcommand():
    from vmf_head.__main__ import COMMANDS

    assert COMMANDS["accuracy"][0] == "vmf_head.accuracy"
