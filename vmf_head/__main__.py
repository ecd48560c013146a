"""Command line: ``python -m vmf_head <command>`` (also installed as ``vmf-head``).

Commands are modules with a ``main(argv) -> int``; they are imported only when called so that
``--help`` stays fast and optional dependencies stay optional.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "ablation": (
        "vmf_head.demo.ablation",
        "the paper's ablation grid, norm analysis and a stability probe at demo scale",
    ),
    "accuracy": ("vmf_head.accuracy", "table of log C_p errors against mpmath, and where scipy fails"),
    "check": ("vmf_head.check", "check the kernels against the reference on this machine; versions, timing, JSON"),
    "collapse": (
        "vmf_head.demo.collapse",
        "a uniform and a one-hot collapse reproduced at demo scale, and when the collapse monitor flags them",
    ),
    "demo": ("vmf_head.demo", "train DINO and DINO-vMF side by side on bundled digits; table, JSON, figure"),
    "run": ("vmf_head.run", "run DINO/iBOT/DINOv2's own training script, unchanged, as its vMF version"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: vmf-head <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
