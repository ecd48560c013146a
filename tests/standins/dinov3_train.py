"""Stand-in for facebookresearch/dinov3's ``dinov3/train/train.py``, laid out as it is: top-level imports of
``SSLMetaArch`` and ``MultiDistillationMetaArch``, an argument parser, ``main()`` that picks the
meta-architecture by name from the config, builds it on the meta device, calls
``prepare_for_distributed_training``, fills every tensor with NaN, then ``do_train``: ``init_weights``, a
per-iteration numpy teacher-temperature schedule, ``forward_backward(data, teacher_temp=..., iteration=...)``,
optimizer step, ``update_ema``, a checkpoint of ``model.state_dict()``. It imports the stand-in
``dinov3`` module from its own directory; ``--iterations`` stands for the config's epoch length. Losses go
to ``losses.json`` in ``--output-dir``."""

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from dinov3 import MultiDistillationMetaArch, SSLMetaArch, collate, default_cfg, make_samples, teacher_temp_schedule


def get_args_parser():
    parser = argparse.ArgumentParser("DINOv3 training")
    parser.add_argument("--output-dir", default="./local_dino", type=str)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--iterations", default=3, type=int)
    parser.add_argument("--multi-distillation", action="store_true")
    return parser


def do_train(cfg, model, args):
    model.train()
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=0.05)
    temps = teacher_temp_schedule(args.iterations)
    model.init_weights()
    losses = []
    for it in range(args.iterations):
        data = collate(make_samples(3, seed=it))
        optimizer.zero_grad(set_to_none=True)
        total_loss, _ = model.forward_backward(data, teacher_temp=temps[it], iteration=it)
        optimizer.step()
        model.update_ema(0.7)
        losses.append(total_loss.item())
    output = Path(args.output_dir)
    torch.save({"model": model.state_dict(), "iteration": args.iterations - 1}, output / "checkpoint.pth")
    (output / "losses.json").write_text(json.dumps(losses))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = default_cfg(multidistillation=args.multi_distillation)
    cfg.MODEL = SimpleNamespace(
        META_ARCHITECTURE="MultiDistillationMetaArch" if args.multi_distillation else "SSLMetaArch"
    )
    meta_archs = {"SSLMetaArch": SSLMetaArch, "MultiDistillationMetaArch": MultiDistillationMetaArch}
    meta_arch = meta_archs.get(cfg.MODEL.META_ARCHITECTURE)
    with torch.device("meta"):
        model = meta_arch(cfg)
    model.prepare_for_distributed_training()
    model._apply(
        lambda t: torch.full_like(
            t, fill_value=math.nan if t.dtype.is_floating_point else (2 ** (t.dtype.itemsize * 8 - 1)), device="cpu"
        ),
        recurse=True,
    )
    do_train(cfg, model, args)


if __name__ == "__main__":
    main()
