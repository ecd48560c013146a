"""``vmf-head check``: passes here, writes what it says, and fails loudly (naming the op) when a
kernel is made wrong.

Without a GPU the command runs the kernels in Triton's interpreter (tests/conftest.py has already
set TRITON_INTERPRET=1 for this process; the subprocess test leaves it unset so that the command
sets it itself). On a GPU machine the same tests check the compiled kernels, without the timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vmf_head import _dispatch, check

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
# The timing compiles DINO's loss at full size: seconds to minutes, and not what these tests check.
ARGS = ["--no-timing"] if CUDA else []
OPS = ("log_vmf_normalizer", "vmf_mean_resultant_length", "prototype_log_normalizer", "DINOvMFLoss", "iBOTvMFLoss")


def _kernels_here() -> bool:
    return check.kernel_status(torch.device("cuda" if CUDA else "cpu"))[0]


needs_kernels = pytest.mark.skipif(not _kernels_here(), reason="needs Triton (a CUDA GPU, or TRITON_INTERPRET=1)")


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory) -> tuple[int, dict]:
    path = tmp_path_factory.mktemp("check") / "check.json"
    rc = check.main([*ARGS, "--json", str(path)])
    return rc, json.loads(path.read_text())


def test_passes_and_writes_every_check(passing_run):
    rc, report = passing_run
    assert rc == 0 and report["passed"]
    env = report["environment"]
    assert env["vmf_head"] == check.__version__ and env["torch"] == torch.__version__ and env["device"]
    assert report["sync_debug_mode_error"] == CUDA
    names = " ".join(c["name"] for c in report["checks"])
    assert "against DINO's loss" in names and "kappa / (4 pi sinh kappa)" in names
    for result in report["checks"]:
        assert result["passed"] and result["quantities"], result
        for q in result["quantities"]:
            assert 0.0 <= q["max_error"] <= q["tolerance"] and q["metric"], (result["name"], q)
    assert any("sinkhorn" in note for note in report["notes"])
    if CUDA:
        assert report["timing"] == {"skipped": "--no-timing"}
    else:
        assert "on the CPU" in report["timing"]["skipped"]


@needs_kernels
def test_every_op_is_compared_with_the_kernels_in_both_dtypes(passing_run):
    _, report = passing_run
    assert report["kernels"]["checked"]
    kernel_results = [c for c in report["checks"] if c["against"] == "backend='triton' against backend='reference'"]
    for op in (*OPS, "multicrop_cross_entropy"):
        assert {c["dtype"] for c in kernel_results if op in c["name"]} == {"float32", "bfloat16"}, op
    dino = next(c for c in kernel_results if c["name"].startswith("DINOvMFLoss(centering='probability')"))
    compared = {q["name"] for q in dino["quantities"]}
    assert compared == {"loss", "gradient wrt student_output", "gradient wrt student_norms", "center"}


@needs_kernels
def test_command_line_sets_up_the_interpreter_itself(tmp_path):
    path = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", "vmf_head", "check", *ARGS, "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Triton kernels: checked" in out.stdout and "checks passed" in out.stdout
    report = json.loads(path.read_text())
    assert report["passed"] and report["kernels"]["checked"]


# The entries the package calls in each kernel module (imported at the call, so a patch reaches them).
_ENTRIES = {
    "cross_entropy": ("fused_cross_entropy",),
    "log_normalizer": ("log_normalizer", "prototype_log_normalizer", "prototype_log_normalizer_backward"),
}


def _break(monkeypatch, op: str, fault) -> None:
    """Make every entry of ``op``'s kernel module go wrong by ``fault``."""
    module = _dispatch.kernels(op)
    for name in _ENTRIES[op]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _real=real, **kwargs: fault(_real(*args, **kwargs)))


def _off_by_one_percent(out):
    return tuple(x * 1.01 for x in out) if isinstance(out, tuple) else out * 1.01


def _raise(out):
    raise RuntimeError("the kernel failed on this device")


@needs_kernels
def test_fails_loudly_when_the_fused_loss_is_wrong(monkeypatch, capsys, tmp_path):
    _break(monkeypatch, "cross_entropy", _off_by_one_percent)
    path = tmp_path / "check.json"
    assert check.main([*ARGS, "--json", str(path)]) == 1
    err = capsys.readouterr().err
    assert "vmf-head check FAILED" in err
    line = next(x for x in err.splitlines() if x.startswith("DINOvMFLoss(centering='probability') with prototype"))
    assert line.startswith("DINOvMFLoss(centering='probability') with prototype norms, float32: loss differs from ")
    also = "also gradient wrt student_output, center, gradient wrt student_norms"
    assert f"the reference by 1.0e-02 (tolerance 2.0e-05; {also}) on " in line
    assert line.endswith("pass backend='reference' and report this, with the file `vmf-head check --json PATH` writes")
    failed = {c["name"] for c in json.loads(path.read_text())["checks"] if not c["passed"]}
    # the fused losses fail, the normaliser (another kernel module) does not
    assert any(name.startswith("iBOTvMFLoss") for name in failed)
    assert any(name.startswith("functional.multicrop_cross_entropy") for name in failed)
    assert not any(name.startswith(("log_vmf_normalizer(mode", "prototype_log_normalizer")) for name in failed)


@needs_kernels
def test_fails_loudly_when_the_normaliser_kernel_raises(monkeypatch, capsys):
    _break(monkeypatch, "log_normalizer", _raise)
    assert check.main(ARGS) == 1
    err = capsys.readouterr().err
    assert "log_vmf_normalizer(mode='exact'), float32: backend='triton' raised " in err
    assert "RuntimeError: the kernel failed on this device" in err
    assert "prototype_log_normalizer(W), bfloat16" in err


def test_without_triton_checks_the_reference_and_says_why(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(_dispatch, "kernels", lambda op: ImportError("No module named 'triton'"))
    path = tmp_path / "check.json"
    assert check.main([*ARGS, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Triton kernels: not checked: Triton is not available" in out
    report = json.loads(path.read_text())
    assert not report["kernels"]["checked"] and report["passed"]
    assert [c["against"] for c in report["checks"]] == [
        "reference against closed form",
        "reference against DINO's formulation",
    ]


def test_dino_loss_is_dinos_formulation():
    """The timing peer against a float64 loop written from DINO's definition (one pair at a time)."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4 * 3, 50, generator=g), torch.randn(2 * 3, 50, generator=g)
    center = 0.1 * torch.randn(1, 50, generator=g)
    loss, new_center = check.dino_loss(student, teacher, center, ncrops=4, teacher_temp=0.05)
    q = torch.softmax((teacher.double() - center.double()) / 0.05, dim=-1).view(2, 3, 50)
    log_p = torch.log_softmax(student.double() / 0.1, dim=-1).view(4, 3, 50)
    pairs = [(i, j) for i in range(2) for j in range(4) if i != j]
    want = sum(-(q[i] * log_p[j]).sum(-1).mean() for i, j in pairs) / len(pairs)
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item())
    torch.testing.assert_close(new_center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def test_registered_as_a_subcommand():
    from vmf_head.__main__ import COMMANDS

    assert COMMANDS["check"][0] == "vmf_head.check"
