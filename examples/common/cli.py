"""The runners' command lines: the reference's flags, our own spellings, and one-line errors.

Every runner builds its parser here, so the same flag means the same thing everywhere:

- ``--adapter_type`` (registered adapters), ``--model_size``, ``--tasks a b`` or ``--tasks a,b``;
- ``--seed N`` (the reference's, one run) or ``--seeds 0,1,2`` (several);
- trailing ``key value`` overrides, anywhere after the flags (``adapter.d 16384 training.lr 1e-3``);
- ``--compute_params_only`` (count, no download) and ``--dry_run`` (print the resolved configs);
- runner-specific flags that set config keys (:class:`Flag`), e.g. ViT's ``--base_lr``.

:func:`entry` runs a ``main`` and turns every failure into one line on stderr and a non-zero exit
(argument errors also print the usage, as argparse does): a traceback only with ``GPART_TRACEBACK=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import ADAPTERS, OverrideError, Presets, resolve, to_dict


class RunnerError(Exception):
    """A runner cannot go on: the message names the problem and the fix."""


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets config keys: ``keys`` maps an adapter type (or ``"*"``) to the
    dotted key it sets; ``convert`` turns the parsed value into the override's text."""

    keys: dict[str, str]
    type: Callable = str
    help: str = ""
    action: str | None = None
    convert: Callable[[Any], str] = str
    choices: tuple[str, ...] | None = None

    def key(self, adapter_type: str) -> str:
        return self.keys.get(adapter_type, self.keys["*"])


@dataclass
class Spec:
    """What a runner's parser accepts beyond the common flags."""

    flags: dict[str, Flag] = field(default_factory=dict)
    task_flag: str | None = None  # a flag naming one task (ViT's --dataset)
    task_aliases: dict[str, str] = field(default_factory=dict)  # the reference's spellings
    default_tasks: list[str] | None = None  # None: every task
    default_seed: int = 42  # the reference's


def parser(doc: str, presets: Presets, spec: Spec, *, output_dir: str, multi_task: bool = True):
    p = argparse.ArgumentParser(
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing KEY VALUE pairs override the config, e.g. adapter.d 16384 training.lr 0.001",
    )
    p.add_argument("--adapter_type", default="gpart", choices=sorted(ADAPTERS))
    names = sorted(presets.task)
    if multi_task:
        p.add_argument("--tasks", nargs="+", metavar="TASK", help=f"from {names} (spaces or commas)")
    if spec.task_flag:
        choices = sorted({*names, *spec.task_aliases})
        p.add_argument(spec.task_flag, choices=choices, help="one task (the reference's flag)")
    if presets.size:
        p.add_argument("--model_size", default="base", choices=sorted(presets.size))
    p.add_argument("--seed", type=int, help=f"one run with this seed (default {spec.default_seed})")
    p.add_argument("--seeds", help="several runs, comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--output_dir", default=output_dir)
    p.add_argument("--compute_params_only", action="store_true", help="print parameter counts and exit")
    p.add_argument("--dry_run", action="store_true", help="print the resolved configs and exit")
    for name, flag in spec.flags.items():
        kwargs = {"action": flag.action} if flag.action else {"type": flag.type, "choices": flag.choices}
        p.add_argument(name, help=flag.help, **kwargs)
    return p


def _split_tasks(
    p, tokens: list[str], presets: Presets, aliases: dict[str, str]
) -> tuple[list[str], list[str]]:
    """``--tasks`` tokens -> (tasks, the tokens after them): overrides may follow the task names."""
    tasks: list[str] = []
    for i, token in enumerate(tokens):
        parts = [aliases.get(t, t) for t in token.split(",") if t]
        if not parts or any(t not in presets.task for t in parts):
            if not tasks:
                p.error(f"argument --tasks: unknown task {token!r}; choose from {sorted(presets.task)}")
            return tasks, tokens[i:]
        tasks += parts
    return tasks, []


def parse(
    argv, p, presets: Presets, spec: Spec
) -> tuple[argparse.Namespace, list[str], list[str], list[int]]:
    """(args, tasks, overrides, seeds). Overrides are the leftover ``key value`` tokens."""
    args, rest = p.parse_known_args(argv)
    flags = [t for t in rest if t.startswith("--")]
    if flags:
        p.error(f"unrecognized arguments: {' '.join(flags)}")
    tasks, overrides = None, list(rest)
    if getattr(args, "tasks", None):
        tasks, extra = _split_tasks(p, args.tasks, presets, spec.task_aliases)
        overrides = extra + overrides
    chosen = (
        getattr(args, (spec.task_flag or "").lstrip("-").replace("-", "_"), None) if spec.task_flag else None
    )
    if chosen:
        tasks = [*(tasks or []), spec.task_aliases.get(chosen, chosen)]
    tasks = tasks or spec.default_tasks or sorted(presets.task)
    if args.seed is not None and args.seeds:
        p.error("give --seed (one run) or --seeds (several), not both")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s] if args.seeds else [spec.default_seed]
    except ValueError:
        p.error(f"argument --seeds: expected comma-separated integers, got {args.seeds!r}")
    if args.seed is not None:
        seeds = [args.seed]
    if len(overrides) % 2:
        p.error(
            f"overrides come in 'key value' pairs; got an odd count {overrides}. "
            "Example: adapter.d 16384 training.lr 0.001"
        )
    return args, tasks, overrides, seeds


def flag_overrides(args, spec: Spec, adapter_type: str) -> list[str]:
    """The ``key value`` pairs set by the runner's own flags that were given."""
    out = []
    for name, flag in spec.flags.items():
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value is None or value is False:
            continue
        out += [flag.key(adapter_type), flag.convert(value)]
    return out


def configs(
    argv,
    *,
    doc: str,
    presets: Presets,
    spec: Spec,
    output_dir: str,
    multi_task: bool = True,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
):
    """Parse a command line and resolve one config per (task, seed): ``(args, [cfg, ...])``.
    ``extra(parser)`` adds a script's own arguments (read back from ``args``)."""
    p = parser(doc, presets, spec, output_dir=output_dir, multi_task=multi_task)
    if extra:
        extra(p)
    args, tasks, overrides, seeds = parse(argv, p, presets, spec)
    out = []
    for task in tasks:
        for seed in seeds:
            pairs = ["training.seed", str(seed), "output_dir", args.output_dir]
            pairs += flag_overrides(args, spec, args.adapter_type)
            cfg = resolve(
                presets,
                adapter_type=args.adapter_type,
                task=task,
                model_size=getattr(args, "model_size", "base"),
                overrides=pairs + overrides,
            )
            out.append(cfg)
    return args, out


def dry_run(cfgs) -> list[dict]:
    """Print each resolved config as one JSON line and return them."""
    out = [to_dict(cfg) for cfg in cfgs]
    for d in out:
        print(json.dumps(d, sort_keys=True))
    return out


def entry(main: Callable[[], Any]) -> int:
    """Run ``main()``; any failure becomes one line ``<script>: error: <message>`` and exit code 1
    (argument errors exit 2 with the usage, from argparse). ``GPART_TRACEBACK=1`` re-raises."""
    prog = os.path.basename(sys.argv[0])
    try:
        main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("GPART_TRACEBACK"):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


def one_line(err: BaseException) -> str:
    """The exception's message on one line, prefixed by its type unless it is ours."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, RunnerError | OverrideError) or type(err).__module__.startswith("gpart"):
        return text
    return f"{type(err).__name__}: {text}"


HUB_FIX = (
    "Check the name, your network or HF_TOKEN, or pass a local folder; "
    "--compute_params_only and --dry_run need no download."
)


def hub(what: str, load: Callable[[], Any], fix: str = HUB_FIX) -> Any:
    """Run a hub-dependent step; a failure becomes a :class:`RunnerError` naming what and the fix."""
    try:
        return load()
    except Exception as err:
        raise RunnerError(f"could not load {what} ({one_line(err)[:300]}). {fix}") from err
