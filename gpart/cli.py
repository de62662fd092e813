"""Command line: look inside adapter files and convert between gpart's and the reference's format.

    python -m gpart inspect ADAPTER             # a gpart .safetensors file or a reference folder
    python -m gpart convert ADAPTER.safetensors OUT_DIR
    python -m gpart convert REF_DIR OUT.safetensors --model-config config.json [--model-class NAME]

Converting a reference folder needs the architecture (the folder stores target *patterns*, a
gpart file the resolved names and shapes): ``--model-config`` is a ``transformers`` config
file; the model is built on the ``meta`` device, so no weights are loaded or downloaded.
Errors print one line and exit with status 1; usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import GPartError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    >>> import tempfile, torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     main(["inspect", str(gpart.save(model, f"{tmp}/a.safetensors")), "--json"])  # doctest: +ELLIPSIS
    {...
     "d": 3,
     "seed": 0,
     "D": 16,
    ...}
    0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args, parser)
    except GPartError as err:
        _say(f"gpart: error: {err}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gpart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    p = sub.add_parser(
        "inspect",
        help="settings, D, targets, file size and theta statistics of an adapter",
        description="Print an adapter's settings, D, targets, file size and theta statistics. "
        "ADAPTER is a gpart .safetensors file or a reference (PEFT fork) adapter folder.",
    )
    p.add_argument("adapter", type=Path, metavar="ADAPTER")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--all-targets", action="store_true", help="list every target, not the first and last few")
    p.set_defaults(run=_inspect)
    p = sub.add_parser(
        "convert",
        help="convert between gpart files and reference adapter folders",
        description="Convert a gpart file into a reference adapter folder, or a reference folder "
        "into a gpart file (then --model-config is required).",
    )
    p.add_argument("source", type=Path, metavar="SOURCE", help="gpart .safetensors file or reference folder")
    p.add_argument("target", type=Path, metavar="TARGET", help="reference folder or gpart .safetensors file")
    p.add_argument("--model-config", type=Path, help="transformers config.json of the base model")
    p.add_argument(
        "--model-class",
        help="transformers model class, e.g. BertForSequenceClassification (default: the "
        "config's first 'architectures' entry)",
    )
    p.set_defaults(run=_convert)
    return parser


def _say(text: str, file=None) -> None:
    """Print one line; characters the stream cannot encode (an ASCII terminal) come out escaped."""
    file = file or sys.stdout
    encoding = getattr(file, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding), file=file)


# ------------------------------------------------------------------------------------------ inspect


def _inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    info = _describe_peft(args.adapter) if args.adapter.is_dir() else _describe_gpart(args.adapter)
    if args.json:
        _say(json.dumps(info, indent=1, default=repr))
        return
    targets = info.pop("targets", None)
    for key, value in info.items():
        _say(f"{key:<14}{value}")
    if targets is not None:
        shown = targets if args.all_targets or len(targets) <= 8 else [*targets[:4], None, *targets[-3:]]
        _say(f"{'targets':<14}{len(targets)} tensors, in canonical order:")
        for entry in shown:
            _say("  ..." if entry is None else f"  {entry[0]} {tuple(entry[1])}")


def _theta_stats(theta: torch.Tensor) -> dict:
    t = theta.double()
    finite = torch.isfinite(t)
    return {
        "norm": round(float(t[finite].norm()), 6),
        "mean": round(float(t[finite].mean()), 6) if finite.any() else None,
        "std": round(float(t[finite].std()), 6) if int(finite.sum()) > 1 else None,
        "min": round(float(t[finite].min()), 6) if finite.any() else None,
        "max": round(float(t[finite].max()), 6) if finite.any() else None,
        "zeros": int((t == 0).sum()),
        "non_finite": int((~finite).sum()),
    }


def _describe_gpart(path: Path) -> dict:
    from .serialization import check_theta, parse_metadata, read

    tensors, metadata = read(path)
    config, entries, size = parse_metadata(path, metadata)
    theta = check_theta(path, tensors, config.d)
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "format": f"gpart {metadata['format_version']} ({metadata['algorithm']}), "
        f"written by gpart {metadata.get('gpart_version', '?')}",
        "d": config.d,
        "seed": config.seed,
        "D": size,
        "entries/group": round(size / config.d, 1),
        "settings": {k: v for k, v in config.to_dict().items() if k not in ("d", "seed")},
        "theta": _theta_stats(theta),
        "other tensors": {k: list(v.shape) for k, v in tensors.items() if k != "theta"},
        "targets": [[n, list(s)] for n, s in entries],
    }


def _describe_peft(directory: Path) -> dict:
    from .peft_format import CONFIG_FILE, WEIGHTS_FILE, read_peft

    kwargs, tensors = read_peft(directory)
    files = [directory / CONFIG_FILE, directory / WEIGHTS_FILE]
    return {
        "folder": str(directory),
        "bytes": sum(f.stat().st_size for f in files),
        "format": "reference (PEFT fork) adapter; D and targets depend on the base model",
        "d": kwargs.pop("d"),
        "seed": kwargs.pop("seed"),
        "settings": kwargs,
        "theta": _theta_stats(tensors["theta"]),
        "other tensors": {k: list(v.shape) for k, v in tensors.items() if k != "theta"},
    }


# ------------------------------------------------------------------------------------------ convert


def _convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .peft_format import from_gpart_file, to_gpart_file

    if args.source.is_dir():
        if args.model_config is None:
            parser.error(
                "converting a reference folder needs --model-config (the base model's transformers "
                "config.json): the folder stores target patterns, a gpart file the resolved layout."
            )
        out = to_gpart_file(args.source, _meta_model(args.model_config, args.model_class), args.target)
    else:
        out = from_gpart_file(args.source, args.target)
    _say(f"wrote {out}")


def _meta_model(config_path: Path, class_name: str | None) -> torch.nn.Module:
    from .errors import ConfigError

    try:
        import transformers
    except ImportError:
        raise ConfigError("--model-config needs the transformers package: pip install transformers") from None
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ConfigError(
            f"--model-config {str(config_path)!r} is not a readable JSON file ({type(err).__name__}: "
            f"{str(err)[:200]})."
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"--model-config {str(config_path)!r} holds {type(raw).__name__}, not a JSON object."
        )
    architectures = raw.get("architectures")
    name = class_name or (architectures[0] if isinstance(architectures, list) and architectures else None)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "config_class"):
        raise ConfigError(
            f"model class {name!r} is not a transformers model class; pass --model-class, "
            "e.g. BertForSequenceClassification."
        )
    try:
        config = cls.config_class(**{k: v for k, v in raw.items() if k != "model_type"})
        with torch.device("meta"):
            return cls(config)
    except Exception as err:  # transformers validates configs with its own exception types
        raise ConfigError(
            f"--model-config {str(config_path)!r} does not build a {name} ({type(err).__name__}: "
            f"{str(err)[:200]}); pass the config.json the base model was saved with."
        ) from None
