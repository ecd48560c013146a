"""``python -m vmf_head.run``: the unchanged stand-in ``standins/main_dino.py`` (DINO's layout, see its
docstring) trains as DINO-vMF, exactly as with the one-line patch; scripts laid out otherwise fail loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from standins import dino as D
from standins import dinov3 as D3

from vmf_head import run
from vmf_head.integrations import FrozenNormsWarning
from vmf_head.integrations import dino as vmf_dino
from vmf_head.integrations import dinov3 as vmf_dinov3

SCRIPT = Path(__file__).parent / "standins" / "main_dino.py"
ARGS = ["--epochs", "2", "--steps_per_epoch", "2", "--norm_last_layer", "false"]

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


def _one_line_patch_losses():
    """The same training as the script, with the patch added by hand."""
    student, teacher = D.build_networks(32, norm_last_layer=False, bottleneck_dim=8)
    loss_fn = vmf_dino.patch(student, teacher, D.DINOLoss(32, 4, 0.04, 0.07, 1, 2))
    optimizer = torch.optim.AdamW(D.get_params_groups(student), lr=0.05)
    return [
        D.train_step(
            student, teacher, teacher, loss_fn, D.crops(n_local=2, seed=2 * epoch + it), optimizer, epoch, 0.7
        ).item()
        for epoch in range(2)
        for it in range(2)
    ]


def test_runner_trains_the_unchanged_script_as_the_one_line_patch(tmp_path):
    assert run.main(["dino", str(SCRIPT), *ARGS, "--output_dir", str(tmp_path)]) == 0
    losses = json.loads((tmp_path / "log.json").read_text())
    assert losses == pytest.approx(_one_line_patch_losses(), abs=1e-6)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    # the vMF loss's probability center, saved under DINO's key
    assert set(checkpoint["dino_loss"]) == {"center"}
    torch.testing.assert_close(checkpoint["dino_loss"]["center"].sum(), torch.tensor(1.0))
    student, teacher = D.build_networks(32, norm_last_layer=False, bottleneck_dim=8, seed=3)
    student.load_state_dict(checkpoint["student"])
    teacher.load_state_dict(checkpoint["teacher"])


def test_runner_from_the_command_line(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmf_head.run",
            "dino",
            "--centering",
            "logit",
            str(SCRIPT),
            "--epochs",
            "1",
            "--steps_per_epoch",
            "1",
            "--output_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "FrozenNormsWarning" in done.stderr  # the script's default --norm_last_layer true
    assert (tmp_path / "checkpoint.pth").exists()


def _script(tmp_path, body):
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_script_without_the_loss_class_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    script = _script(
        tmp_path,
        f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("ran")
    """,
    )
    with pytest.raises(run.RunnerError, match="binds no top-level name 'DINOLoss'"):
        run.run_script("dino", str(script), [])
    assert not marker.exists()
    assert run.main(["dino", str(script)]) == 1


def test_script_that_never_builds_the_loss_fails_at_exit(tmp_path):
    script = _script(
        tmp_path,
        """
        class DINOLoss:
            pass
        if __name__ == "__main__":
            import sys
            sys.exit(0)
    """,
    )
    with pytest.raises(run.RunnerError, match="finished without building DINOLoss"):
        run.run_script("dino", str(script), [])


def test_loss_built_without_student_and_teacher_in_scope_fails(tmp_path):
    script = _script(
        tmp_path,
        """
        class DINOLoss:
            def __init__(self, *args):
                pass
        def build():
            return DINOLoss(32, 4)
        build()
    """,
    )
    with pytest.raises(run.RunnerError, match="no local variable 'student' or 'teacher'"):
        run.run_script("dino", str(script), [])


def test_script_failure_propagates_and_main_module_is_restored(tmp_path):
    script = _script(
        tmp_path,
        """
        class DINOLoss:
            pass
        raise KeyError("from the script")
    """,
    )
    main_module = sys.modules["__main__"]
    with pytest.raises(KeyError, match="from the script"):
        run.run_script("dino", str(script), [])
    assert sys.modules["__main__"] is main_module


def test_frozen_norms_warn_through_the_runner(tmp_path):
    with pytest.warns(FrozenNormsWarning):
        run.run_script("dino", str(SCRIPT), ["--epochs", "1", "--steps_per_epoch", "1", "--output_dir", str(tmp_path)])


def test_instrument_finds_every_kind_of_top_level_binding():
    for source in (
        "class DINOLoss: pass",
        "from m import Other as DINOLoss",
        "import DINOLoss",
        "DINOLoss = make()",
        "def DINOLoss(): pass",
    ):
        code = run.instrument(source, "<test>", "DINOLoss")
        assert run._HOOK in code.co_names
    with pytest.raises(run.RunnerError):
        run.instrument("def f():\n    class DINOLoss: pass", "<test>", "DINOLoss")


def test_runner_patches_ibot_and_dinov2_layouts(tmp_path):
    """main_ibot.py defines ``iBOTLoss`` at the top level and builds it in ``train_ibot`` after the networks;
    dinov2/train/train.py imports ``SSLMetaArch`` at the top level and builds it in ``main``."""
    out = tmp_path / "types.txt"
    ibot_script = _script(
        tmp_path,
        f"""
        import torch
        from standins import ibot as I
        from standins.dino import get_params_groups

        def train_ibot():
            student, teacher = I.build_networks()
            ibot_loss = iBOTLoss(32, 32, 2, 2, 0.04, 0.07, 0.04, 0.07, 0, 1)
            images, masks = I.crops_and_masks()
            optimizer = torch.optim.AdamW(get_params_groups(student))
            I.train_step(student, teacher, ibot_loss, images, masks, optimizer, 0, 0.9)
            open({str(out)!r}, "a").write(type(ibot_loss).__name__ + "\\n")

        class iBOTLoss(I.iBOTLoss):
            pass

        if __name__ == "__main__":
            train_ibot()
    """,
    )
    run.run_script("ibot", str(ibot_script), [])
    dinov2_script = tmp_path / "dinov2_train.py"
    dinov2_script.write_text(
        textwrap.dedent(f"""
        from standins.dinov2 import SSLMetaArch, collated_batch, default_cfg

        def main():
            model = SSLMetaArch(default_cfg())
            model.prepare_for_distributed_training()
            model.forward_backward(collated_batch(), teacher_temp=0.04)
            open({str(out)!r}, "a").write(type(model.dino_loss).__name__ + " " + type(model.ibot_patch_loss).__name__)

        if __name__ == "__main__":
            main()
    """)
    )
    run.run_script("dinov2", str(dinov2_script), [])
    assert out.read_text().split() == ["PatchediBOTLoss", "DINOv2vMFLoss", "DINOv2iBOTPatchvMFLoss"]


def test_launcher_rank_argument_goes_to_the_script():
    # torch.distributed.launch -m puts --local-rank=N right after the module name
    assert run._split_launcher_arguments(["--local-rank=3", "dino", "main_dino.py", "--epochs", "1"]) == (
        ["dino", "main_dino.py", "--epochs", "1"],
        ["--local-rank=3"],
    )
    assert run._split_launcher_arguments(["dino", "s.py", "--local_rank=1"]) == (["dino", "s.py", "--local_rank=1"], [])


DINOV3_SCRIPT = Path(__file__).parent / "standins" / "dinov3_train.py"


def _dinov3_one_line_patch_losses(centering, iterations=3):
    """``standins/dinov3_train.py``'s training with the one line added after the model is built."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = D3.SSLMetaArch(D3.default_cfg())
        vmf_dinov3.patch(model, centering=centering)
    model.prepare_for_distributed_training()
    model._apply(lambda t: torch.full_like(t, float("nan"), device="cpu"), recurse=True)
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=0.05)
    model.init_weights()
    losses = []
    for it, temp in enumerate(D3.teacher_temp_schedule(iterations)):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.forward_backward(D3.collate(D3.make_samples(3, seed=it)), teacher_temp=temp, iteration=it)
        optimizer.step()
        model.update_ema(0.7)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("centering", [None, "probability"])
def test_runner_trains_dinov3s_train_script_as_the_one_line_patch(tmp_path, centering):
    """dinov3/train/train.py's layout: SSLMetaArch imported at the top level, built in main() on the meta
    device, then prepared, NaN-filled and initialised; the runner's default centering is the patch's."""
    flags = ["--centering", centering] if centering else []
    assert run.main(["dinov3", *flags, str(DINOV3_SCRIPT), "--output-dir", str(tmp_path), "--iterations", "3"]) == 0
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses == pytest.approx(_dinov3_one_line_patch_losses(centering or "sinkhorn"), abs=1e-6)
    state = torch.load(tmp_path / "checkpoint.pth")["model"]
    D3.SSLMetaArch(D3.default_cfg()).load_state_dict(state)  # strict: DINOv3's keys
    if centering == "probability":
        torch.testing.assert_close(state["dino_loss.center"].sum(), torch.tensor(1.0))


def test_runner_refuses_dinov3_multidistillation_before_training(tmp_path, capsys):
    assert run.main(["dinov3", str(DINOV3_SCRIPT), "--output-dir", str(tmp_path), "--multi-distillation"]) == 1
    assert "MultiDistillationMetaArch" in capsys.readouterr().err
    assert not (tmp_path / "losses.json").exists()
