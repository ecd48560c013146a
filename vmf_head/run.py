"""Run DINO's, iBOT's, DINOv2's or DINOv3's own, unchanged training script as its vMF version.

    python -m vmf_head.run dino   [--centering C] [--mode M] main_dino.py <DINO's arguments>
    python -m vmf_head.run ibot   [--centering C] [--mode M] main_ibot.py <iBOT's arguments>
    python -m vmf_head.run dinov2 [--centering C] [--mode M] dinov2/train/train.py <DINOv2's arguments>
    python -m vmf_head.run dinov3 [--centering C] [--mode M] dinov3/train/train.py <DINOv3's arguments>

(also ``python -m vmf_head run ...``; under ``torchrun``: ``torchrun ... -m vmf_head.run dino main_dino.py ...``;
``--koleo-weight W`` and ``--monitor-every N`` add the collapse options, docs/collapse.md).

How the runner finds the moment to patch. The script is compiled from its source and executed as
``__main__`` (``sys.argv``, ``sys.path[0]`` and ``__file__`` as ``python SCRIPT`` would set them), with one
statement added to its syntax tree: right after every top-level statement that binds the loss name
(``class DINOLoss`` in main_dino.py, ``class iBOTLoss`` in main_ibot.py, ``from ... import SSLMetaArch``
in dinov2/train/train.py and dinov3/train/train.py), the name is rebound to a builder. When the script
builds the object, the builder constructs the original and patches it:

- dino / ibot: the loss is built in ``train_dino`` / ``train_ibot`` after the networks; the builder takes
  ``student`` and ``teacher`` from the local variables of the function that builds the loss and returns
  ``vmf_head.integrations.<codebase>.patch(student, teacher, loss)``. Everything the script does with the
  loss afterwards (``.cuda()``, checkpoint restore and save, calls) goes to the vMF loss.
- dinov2: the builder constructs ``SSLMetaArch(cfg)`` and applies ``vmf_head.integrations.dinov2.patch``
  to it before the script wraps it in FSDP.
- dinov3: the same with ``vmf_head.integrations.dinov3.patch``, on the meta device where ``main`` builds
  the model, before ``prepare_for_distributed_training`` shards and compiles it.

``--centering`` defaults to each patch's own default (``probability``; ``sinkhorn`` for dinov3).

When the script's structure differs, the run fails loudly, never silently trains plain DINO:

- no top-level binding of the name: :class:`RunnerError` before any of the script runs;
- the script builds a class the patch does not support (DINOv3's ``MultiDistillationMetaArch``, bound at
  the top level of its train.py): :class:`RunnerError` when it is built, before training;
- the builder runs where no ``student``/``teacher`` variables exist: the patch raises there;
- the script ends (normally or with ``sys.exit(0)``) without ever building the object: :class:`RunnerError`;
- the object was built but never called: a warning at the end (a run resumed at its last epoch does that).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

from .diagnostics import CollapseMonitor
from .functional.centering import CENTERINGS
from .special.vmf import MODES

__all__ = ["TARGETS", "RunnerError", "main", "run_script"]


class RunnerError(RuntimeError):
    """The script's structure does not let the runner apply the patch (raised instead of training DINO)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What to wrap in a codebase's training script and how to patch what it builds."""

    script: str  # the script the codebase trains with, for messages
    name: str  # the top-level name bound to the loss class (or the model class) in that script
    build: Callable[..., Any]  # build(original_class, args, kwargs, caller_frame, options) -> patched object
    watched: Callable[[Any], list] = lambda built: [built]  # modules whose calls show that training ran
    refused: tuple[tuple[str, str], ...] = ()  # (top-level name, why) of classes the patch cannot handle


def _loss_builder(codebase: str) -> Callable[..., Any]:
    def build(cls, args, kwargs, frame, options):
        import importlib

        patch = importlib.import_module(f"vmf_head.integrations.{codebase}").patch
        found = {name: frame.f_locals.get(name) for name in ("student", "teacher")}
        missing = [name for name, value in found.items() if value is None]
        if missing:
            raise RunnerError(
                f"{cls.__name__} was built in {frame.f_code.co_name}() ({frame.f_code.co_filename}:{frame.f_lineno}), "
                f"where no local variable {' or '.join(repr(m) for m in missing)} exists. The runner takes the student "
                "and teacher networks from the function that builds the loss, as the original script does; for a "
                f"script laid out differently, add the one-line patch instead: "
                f"loss = vmf_head.integrations.{codebase}.patch(student, teacher, loss)"
            )
        return patch(found["student"], found["teacher"], cls(*args, **kwargs), **options)

    return build


def _model_builder(codebase: str) -> Callable[..., Any]:
    def build(cls, args, kwargs, frame, options):
        import importlib

        return importlib.import_module(f"vmf_head.integrations.{codebase}").patch(cls(*args, **kwargs), **options)

    return build


def _losses_of(model: Any) -> list:
    return [getattr(model, name) for name in ("dino_loss", "ibot_patch_loss") if hasattr(model, name)]


TARGETS: dict[str, Target] = {
    "dino": Target("main_dino.py", "DINOLoss", _loss_builder("dino")),
    "ibot": Target("main_ibot.py", "iBOTLoss", _loss_builder("ibot")),
    "dinov2": Target("dinov2/train/train.py", "SSLMetaArch", _model_builder("dinov2"), watched=_losses_of),
    "dinov3": Target(
        "dinov3/train/train.py",
        "SSLMetaArch",
        _model_builder("dinov3"),
        watched=_losses_of,
        refused=(
            (
                "MultiDistillationMetaArch",
                "DINOv3 multi-distillation (--multi-distillation) trains students in "
                "process subgroups, which the vMF losses do not support; train a plain SSLMetaArch run",
            ),
        ),
    ),
}

_HOOK = "__vmf_head_wrap__"
_REFUSE = "__vmf_head_refuse__"


def _binds(statement: ast.stmt, name: str) -> bool:
    if isinstance(statement, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return statement.name == name
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return any((alias.asname or alias.name.split(".")[0]) == name for alias in statement.names)
    if isinstance(statement, (ast.Assign, ast.AnnAssign)):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        return any(isinstance(node, ast.Name) and node.id == name for t in targets for node in ast.walk(t))
    return False


def instrument(source: str, filename: str, name: str, refused: tuple[str, ...] = ()) -> types.CodeType:
    """Compile ``source`` with ``name = __vmf_head_wrap__(name)`` after each top-level binding of ``name``
    (and ``r = __vmf_head_refuse__(r, "r")`` after each of a name ``r`` in ``refused``).

    Raises:
        RunnerError: no top-level statement binds ``name``.
    """
    tree = ast.parse(source, filename=filename)
    body: list[ast.stmt] = []
    wrapped = False
    for statement in tree.body:
        body.append(statement)
        if _binds(statement, name):
            body.append(ast.copy_location(ast.parse(f"{name} = {_HOOK}({name})").body[0], statement))
            wrapped = True
        for other in refused:
            if _binds(statement, other):
                body.append(ast.copy_location(ast.parse(f"{other} = {_REFUSE}({other}, {other!r})").body[0], statement))
    if not wrapped:
        raise RunnerError(
            f"{filename} binds no top-level name {name!r}, so the runner cannot tell when it builds it. Apply the "
            "patch with one line in the script instead (see docs/integrations/)."
        )
    tree.body = body
    return compile(ast.fix_missing_locations(tree), filename, "exec")


class _Wrapper:
    """What the script's name is rebound to: builds the original, patches it, remembers it."""

    def __init__(self, original: Any, target: Target, options: dict[str, Any]) -> None:
        self.original = original
        self.target = target
        self.options = options
        self.built: list[Any] = []
        self.called: list[bool] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        obj = self.target.build(self.original, args, kwargs, sys._getframe(1), self.options)
        index = len(self.built)
        self.built.append(obj)
        self.called.append(False)
        for module in self.target.watched(obj):
            module.register_forward_pre_hook(lambda *_: self.called.__setitem__(index, True))
        return obj

    def __getattr__(self, attribute: str) -> Any:  # class attributes and isinstance-free uses still work
        return getattr(self.original, attribute)


class _Refused:
    """What a refused name is rebound to: building it raises :class:`RunnerError`."""

    def __init__(self, original: Any, reason: str) -> None:
        self.original, self.reason = original, reason

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RunnerError(f"the script builds {getattr(self.original, '__name__', self.original)}: {self.reason}")

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.original, attribute)


def run_script(
    codebase: str,
    script: str,
    argv: list[str],
    *,
    centering: str | None = None,
    mode: str = "exact",
    koleo_weight: float = 0.0,
    monitor_every: int = 0,
) -> None:
    """Execute ``script`` with arguments ``argv`` as ``__main__``, with the vMF patch of ``codebase`` applied.

    ``centering=None`` leaves the patch's default (see the module docstring). ``koleo_weight`` and
    ``monitor_every`` (a :class:`~vmf_head.diagnostics.CollapseMonitor` checking every so many steps and
    printing its reports; 0: none) are the patches' collapse options (docs/collapse.md).

    Raises:
        ValueError: unknown ``codebase``, ``centering`` or ``mode``.
        RunnerError: see the module docstring. Exceptions and ``SystemExit`` of the script propagate.
    """
    if codebase not in TARGETS:
        raise ValueError(f"codebase must be one of {sorted(TARGETS)}, got {codebase!r}")
    if centering is not None and centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    target = TARGETS[codebase]
    reasons = dict(target.refused)
    options = {"mode": mode, "koleo_weight": koleo_weight} | ({"centering": centering} if centering is not None else {})
    if monitor_every:
        options["monitor"] = CollapseMonitor(monitor_every, log=lambda report: print(_report_line(report), flush=True))
    path = os.path.abspath(script)
    with open(path, encoding="utf-8") as handle:
        code = instrument(handle.read(), path, target.name, tuple(reasons))

    wrap_calls: list[_Wrapper] = []

    def hook(original: Any) -> _Wrapper:
        wrapper = _Wrapper(original, target, options)
        wrap_calls.append(wrapper)
        return wrapper

    module = types.ModuleType("__main__")
    module.__dict__.update(
        {
            "__file__": path,
            "__builtins__": __builtins__,
            _HOOK: hook,
            _REFUSE: lambda original, name: _Refused(original, reasons[name]),
        }
    )
    saved = sys.modules.get("__main__"), sys.argv, list(sys.path)
    sys.modules["__main__"], sys.argv = module, [path, *argv]
    sys.path.insert(0, os.path.dirname(path))
    try:
        try:
            exec(code, module.__dict__)
        except SystemExit as stop:
            if stop.code not in (None, 0):
                raise
    finally:
        sys.modules["__main__"], sys.argv = saved[0], saved[1]
        sys.path[:] = saved[2]
    built = [obj for wrapper in wrap_calls for obj in wrapper.built]
    if not built:
        raise RunnerError(
            f"{os.path.basename(path)} finished without building {target.name}, so nothing was patched. The runner "
            f"expects {target.script}'s structure; use the one-line patch for other scripts (docs/integrations/)."
        )
    if not any(flag for wrapper in wrap_calls for flag in wrapper.called):
        warnings.warn(
            f"the patched {target.name} was built but never called: the script trained no step",
            RuntimeWarning,
            stacklevel=2,
        )


def _report_line(report) -> str:
    figures = ", ".join(f"{k} {v:.4g}" for k, v in report.scalars().items() if k != "status")
    return f"vmf_head collapse monitor, step {report.step}: {report.status}; {figures}"


def _split_launcher_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """``torch.distributed.launch -m`` puts ``--local-rank=N`` before our arguments; hand it to the script."""
    own, passed = [], []
    for arg in argv:
        (passed if arg.startswith(("--local-rank=", "--local_rank=")) and not own else own).append(arg)
    return own, passed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, launcher = _split_launcher_arguments(argv)
    parser = argparse.ArgumentParser(
        prog="python -m vmf_head.run",
        description="Run a DINO/iBOT/DINOv2/DINOv3 training script, unchanged, as DINO-vMF/iBOT-vMF.",
    )
    parser.add_argument("codebase", choices=sorted(TARGETS))
    parser.add_argument(
        "--centering",
        choices=CENTERINGS,
        default=None,
        help="teacher centering (default: the patch's, probability, the DINO-vMF setting; "
        "sinkhorn, DINOv3's own, for dinov3)",
    )
    parser.add_argument("--mode", choices=MODES, default="exact", help="log C_p computation (default: exact)")
    parser.add_argument(
        "--koleo-weight",
        type=float,
        default=0.0,
        help="KoLeo on the student's prototypes, this weight (default 0: off)",
    )
    parser.add_argument(
        "--monitor-every", type=int, default=0, help="check for collapse every N steps and print it (default 0: off)"
    )
    parser.add_argument("script", help="the training script, e.g. main_dino.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    args = parser.parse_args(argv)
    try:
        run_script(
            args.codebase,
            args.script,
            launcher + args.script_args,
            centering=args.centering,
            mode=args.mode,
            koleo_weight=args.koleo_weight,
            monitor_every=args.monitor_every,
        )
    except RunnerError as error:
        print(f"vmf_head.run: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
