"""The adapter file: one safetensors file holding ``theta`` (and optionally other trainable tensors).

Layout of a file (format version 1):

* tensor ``theta``: float32, length d.
* tensors ``trainable.<parameter name>``: the model's other trainable parameters (e.g. a
  classification head), when saved with ``trainable=True``.
* string metadata: ``format`` (``"gpart"``), ``format_version``, ``algorithm`` (the partition
  rule's version id), ``gpart_version``, ``d``, ``seed``, ``D``, ``config`` (JSON: isometric,
  bias, dropout, init_bound, trainable) and ``targets`` (JSON list of ``[name, shape]`` in
  canonical order), enough to rebuild the adapter on a plain model and to verify it on an adapted
  one.

A theta-only file is ``4 * d`` bytes plus the header. No pickle is involved anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from itertools import zip_longest
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .core import _check_runtime, _find_state, _install, _plan, _state
from .errors import FormatError, GPartError, LayoutError
from .parametrization import GPartConfig
from .partition import ALGORITHM

__all__ = ["FORMAT_VERSION", "load", "read", "save"]

FORMAT = "gpart"
#: Version of the file layout described above.
FORMAT_VERSION = "1"
_THETA = "theta"
_EXTRA = "trainable."


def save(model: nn.Module, path: str | os.PathLike, *, trainable: bool = True) -> Path:
    """Write the adapter of ``model`` to ``path`` (safetensors), atomically; return the path.

    With ``trainable=True`` (default) the model's other trainable parameters (e.g. a head kept
    trainable with ``apply(..., trainable=[...])``) are saved too. The file is written beside
    ``path`` and renamed into place, so a crash mid-save never leaves a half-written adapter.

    Under FSDP2 (``fully_shard``) theta and the other trainable tensors are sharded: call ``save``
    on every rank; it gathers them (a collective) and rank 0 writes the file.

    >>> import tempfile, torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = gpart.save(model, f"{tmp}/adapter.safetensors")
    ...     sorted(gpart.read(path)[0])
    ['theta']
    """
    state = _state(model)
    extras = {}
    if trainable:
        extras = {n: p for n, p in model.named_parameters() if p.requires_grad and p is not state.theta}
    theta = _gathered(state.theta)
    extras = {n: _gathered(p) for n, p in extras.items()}
    if _is_sharded(state.theta) and torch.distributed.get_rank() != 0:
        return Path(path)
    return _write(Path(path), state.config, state.layout.entries(), state.layout.size, theta, extras)


def _is_sharded(t: torch.Tensor) -> bool:
    return callable(getattr(t, "full_tensor", None))  # a DTensor (FSDP2), without importing it


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathers a DTensor's shards (a collective: every rank must call)."""
    return t.full_tensor() if _is_sharded(t) else t


def _write(
    path: Path,
    config: GPartConfig,
    entries: list,
    size: int,
    theta: torch.Tensor,
    extras: dict[str, torch.Tensor],
) -> Path:
    """The file for an adapter given by its parts (also used by format conversion)."""
    tensors = {_THETA: theta.detach().to("cpu", torch.float32, copy=True).contiguous()}
    tensors.update({_EXTRA + n: t.detach().to("cpu", copy=True).contiguous() for n, t in extras.items()})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "gpart_version": __version__,
        "d": str(config.d),
        "seed": str(config.seed),
        "D": str(size),
        "config": json.dumps(
            {k: v for k, v in config.to_dict().items() if k not in ("d", "seed")}, sort_keys=True
        ),
        "targets": json.dumps(entries, separators=(",", ":")),
    }
    _atomic_save(tensors, metadata, path)
    return path


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    if not path.parent.is_dir():
        raise FormatError(
            f"cannot save to {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first."
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, after checking it is a readable gpart file.

    >>> import gpart
    >>> gpart.read("no/such/file.safetensors")
    Traceback (most recent call last):
    ...
    gpart.errors.FormatError: no adapter file at 'no/such/file.safetensors'; ...
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"no adapter file at {str(path)!r}; check the path (gpart.save writes one file).")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as err:  # safetensors raises its own error types, or OSError
        raise FormatError(
            f"{str(path)!r} is not a readable safetensors file ({type(err).__name__}: {err}); "
            "gpart adapters are written by gpart.save."
        ) from None
    if metadata.get("format") != FORMAT:
        raise FormatError(
            f"{str(path)!r} is a safetensors file but not a gpart adapter (format="
            f"{metadata.get('format')!r}, expected {FORMAT!r}); write it with gpart.save."
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{str(path)!r} has format_version={metadata.get('format_version')!r}; this gpart "
            f"({__version__}) reads version {FORMAT_VERSION}. Upgrade gpart to read it."
        )
    if metadata.get("algorithm") != ALGORITHM:
        raise FormatError(
            f"{str(path)!r} uses partition algorithm {metadata.get('algorithm')!r}; this gpart "
            f"implements {ALGORITHM!r}. Use a gpart version that implements it."
        )
    return tensors, metadata


def _parse(path: Path, metadata: dict[str, str]) -> tuple[GPartConfig, list[tuple[str, list[int]]]]:
    try:
        options = json.loads(metadata["config"])
        config = GPartConfig(
            d=int(metadata["d"]),
            seed=int(metadata["seed"]),
            isometric=bool(options["isometric"]),
            bias=str(options["bias"]),
            dropout=float(options["dropout"]),
            init_bound=float(options["init_bound"]),
            trainable=tuple(options["trainable"]),
        )
        entries = [(str(n), [int(s) for s in shape]) for n, shape in json.loads(metadata["targets"])]
    except (KeyError, ValueError, TypeError) as err:
        raise FormatError(
            f"{str(path)!r} has malformed gpart metadata ({type(err).__name__}: {err}); the file "
            "was edited or truncated. Save the adapter again."
        ) from None
    return config, entries


def _check_theta(path: Path, tensors: dict[str, torch.Tensor], d: int) -> torch.Tensor:
    if _THETA not in tensors:
        raise FormatError(
            f"{str(path)!r} has no {_THETA!r} tensor (found {sorted(tensors)}); it is not a complete adapter."
        )
    unexpected = sorted(k for k in tensors if k != _THETA and not k.startswith(_EXTRA))
    if unexpected:
        raise FormatError(
            f"{str(path)!r} holds unexpected tensors {unexpected}; a gpart file holds {_THETA!r} and "
            f"'{_EXTRA}*' tensors only."
        )
    theta = tensors[_THETA]
    if theta.dtype != torch.float32 or theta.shape != (d,):
        raise FormatError(
            f"{str(path)!r}: theta has dtype {theta.dtype} and shape {tuple(theta.shape)}, but the "
            f"format requires float32 of shape ({d},) (d={d}). The file is corrupt; save it again."
        )
    if not torch.isfinite(theta).all():
        bad = int((~torch.isfinite(theta)).sum())
        raise FormatError(
            f"{str(path)!r}: theta has {bad} NaN/inf entries; training diverged before saving. "
            "Use an earlier checkpoint or a lower learning rate."
        )
    return theta


def _layout_differences(
    model_config: GPartConfig | None, model_entries: list, config: GPartConfig, entries: list
) -> list[str]:
    diffs = []
    if model_config is not None:
        for field in ("d", "seed", "isometric", "bias"):
            a, b = getattr(config, field), getattr(model_config, field)
            if a != b:
                diffs.append(f"{field}: file {a!r}, model {b!r}")
    for i, (a, b) in enumerate(zip_longest(entries, model_entries)):
        if a != b:
            diffs.append(f"target {i}: file {a}, model {b}")
    return diffs


def _fit_params(
    model: nn.Module, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, nn.Parameter], list[str]]:
    """The model's parameter for each named tensor, and one line per name that is missing or misshaped."""
    out, problems = {}, []
    for name, value in tensors.items():
        try:
            param = model.get_parameter(name)
        except AttributeError:
            problems.append(f"{name!r} is not a parameter of {type(model).__name__}")
            continue
        if param.shape != value.shape:
            problems.append(
                f"{name!r} has shape {tuple(value.shape)} in the file, {tuple(param.shape)} in the model"
            )
        out[name] = param
    return out, problems


def _check_extras(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    extras = {k[len(_EXTRA) :]: v for k, v in tensors.items() if k.startswith(_EXTRA)}
    out, problems = _fit_params(model, extras)
    if problems:
        raise LayoutError(
            f"{str(path)!r}: saved trainable tensors do not fit the model: "
            + "; ".join(problems)
            + ". Load into the architecture the adapter was trained on."
        )
    return out


def load(
    model: nn.Module, path: str | os.PathLike, *, backend: str = "auto", recompute: bool = True
) -> nn.Module:
    """Load an adapter file into ``model`` and return the model.

    On a model without gpart, applies gpart with the file's settings and target list first
    (``backend`` and ``recompute`` as in :func:`gpart.apply`); on an adapted model, verifies that
    settings and layout match. Any mismatch raises one
    :class:`LayoutError` that lists every difference, and leaves the model untouched.

    >>> import tempfile, torch, gpart
    >>> torch.manual_seed(0) and None
    >>> base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> fresh.load_state_dict(base.state_dict())
    <All keys matched successfully>
    >>> model = gpart.apply(base, d=3, seed=0, init_bound=0.5)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = gpart.load(fresh, gpart.save(model, f"{tmp}/a.safetensors"))
    >>> torch.equal(fresh(torch.ones(1, 4)), model(torch.ones(1, 4)))
    True
    """
    _check_runtime(backend, recompute)
    path = Path(path)
    tensors, metadata = read(path)
    config, entries = _parse(path, metadata)
    theta = _check_theta(path, tensors, config.d)
    state = _find_state(model)
    if state is None:
        names = [n for n, _ in entries]
        try:
            layout, scale, backend = _plan(
                model, config, targets=None, target_parameters=(), exact=names, backend=backend
            )
        except GPartError as err:
            raise LayoutError(f"{str(path)!r} does not fit {type(model).__name__}: {err}") from None
        diffs = _layout_differences(None, layout.entries(), config, entries)
    else:
        diffs = _layout_differences(state.config, state.layout.entries(), config, entries)
    if diffs:
        raise LayoutError(
            f"{str(path)!r} was saved for another layout ({len(diffs)} difference(s)): "
            + "; ".join(diffs)
            + ". Load it into the same architecture with the same targets and settings."
        )
    extras = _check_extras(path, model, tensors)
    if state is None:
        _install(model, config, layout, scale, freeze=True, backend=backend, recompute=recompute)
        state = _state(model)
    with torch.no_grad():
        state.theta.copy_(theta)
        for name, param in extras.items():
            param.copy_(tensors[_EXTRA + name])
    return model
