"""Stand-in for facebookresearch/dino's ``main_dino.py``, laid out as it is: an argument parser, a
``train_dino(args)`` that builds ``student`` and ``teacher`` (``MultiCropWrapper``s), then the loss from the
class ``DINOLoss`` defined at the top level of this script, an optimizer from ``get_params_groups``, the
training loop, DINO's ``save_dict`` checkpoint; ``if __name__ == '__main__'`` parses and trains.
It imports its helpers from its own directory as DINO imports ``utils``. Losses go to ``log.json``."""

import argparse
import json
from pathlib import Path

import dino as utils
import torch


def bool_flag(s):
    return s.lower() in ("on", "true", "1")


def get_args_parser():
    parser = argparse.ArgumentParser("DINO", add_help=False)
    parser.add_argument("--out_dim", default=32, type=int)
    parser.add_argument("--norm_last_layer", default=True, type=bool_flag)
    parser.add_argument("--warmup_teacher_temp", default=0.04, type=float)
    parser.add_argument("--teacher_temp", default=0.07, type=float)
    parser.add_argument("--warmup_teacher_temp_epochs", default=1, type=int)
    parser.add_argument("--epochs", default=2, type=int)
    parser.add_argument("--steps_per_epoch", default=2, type=int)
    parser.add_argument("--local_crops_number", default=2, type=int)
    parser.add_argument("--output_dir", default=".", type=str)
    return parser


def train_dino(args):
    student, teacher = utils.build_networks(args.out_dim, norm_last_layer=args.norm_last_layer, bottleneck_dim=8)
    teacher_without_ddp = teacher
    dino_loss = DINOLoss(
        args.out_dim,
        args.local_crops_number + 2,
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
    )
    optimizer = torch.optim.AdamW(utils.get_params_groups(student), lr=0.05)
    losses = []
    for epoch in range(args.epochs):
        for it in range(args.steps_per_epoch):
            images = utils.crops(n_local=args.local_crops_number, seed=epoch * args.steps_per_epoch + it)
            loss = utils.train_step(student, teacher, teacher_without_ddp, dino_loss, images, optimizer, epoch, 0.7)
            losses.append(loss.item())
        save_dict = {
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "args": args,
            "dino_loss": dino_loss.state_dict(),
        }
        torch.save(save_dict, Path(args.output_dir) / "checkpoint.pth")
    (Path(args.output_dir) / "log.json").write_text(json.dumps(losses))


class DINOLoss(utils.DINOLoss):
    """Defined in the script, as main_dino.py defines its DINOLoss."""


if __name__ == "__main__":
    parser = argparse.ArgumentParser("DINO", parents=[get_args_parser()])
    args = parser.parse_args()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    train_dino(args)
