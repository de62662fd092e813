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
import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .core import (
    DEFAULT,
    SWAPPABLE,
    adapter_state,
    adapter_states,
    atomic,
    check_name,
    check_runtime,
    find_state,
    install_adapter,
    installed_targets,
    make_config,
    plan_adapter,
    plan_swap,
    state_attr,
    swap_partition,
    trainable_outside_adapters,
)
from .errors import ConfigError, FormatError, GPartError, LayoutError, StateError
from .parametrization import Backend, GPartConfig
from .partition import ALGORITHM
from .targets import name_matches

__all__ = ["FORMAT_VERSION", "load", "read", "save"]

FORMAT = "gpart"
#: Version of the file layout described above.
FORMAT_VERSION = "1"
_THETA = "theta"
_OPTIONAL = {
    "scope": "global",
    "assignment": "hash",
    "projection": "partition",
    "block_containers": [],
}  # settings written only when not the default
EXTRA = "trainable."


def save(model: nn.Module, path: str | os.PathLike, *, trainable: bool = True, name: str = DEFAULT) -> Path:
    """Write the adapter ``name`` of ``model`` to ``path`` (safetensors), atomically; return the path.

    With ``trainable=True`` (default) the model's other trainable parameters (e.g. a head kept
    trainable with ``apply(..., trainable=[...])``, never another adapter's theta) are saved too.
    The file is written beside ``path`` and renamed into place, so a crash mid-save never leaves a
    half-written adapter.

    Under FSDP2 (``fully_shard``) theta and the other trainable tensors are sharded: call ``save``
    on every rank; it gathers them (a collective) and rank 0 writes the file.

    >>> import tempfile, torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = gpart.save(model, f"{tmp}/adapter.safetensors")
    ...     sorted(gpart.read(path)[0])
    ['theta']
    """
    path = as_path(path, "save")
    state = adapter_state(model, name)
    extras, config = {}, state.config
    if trainable:
        extras = trainable_outside_adapters(model)
        config = _declaring(state, config, extras)
    theta = _gathered(state.theta)
    extras = {n: _gathered(p) for n, p in extras.items()}
    if _is_sharded(state.theta) and torch.distributed.get_rank() != 0:
        return path
    return write_file(path, config, state.layout.entries(), state.layout.size, theta, extras)


def as_path(path: object, verb: str) -> Path:
    """``path`` as a Path, or a :class:`ConfigError` naming what was passed."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(
            f"{verb}: path {path!r} ({type(path).__name__}) must be a str or os.PathLike, e.g. "
            "'adapter.safetensors'."
        )
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\0" in text:
        raise ConfigError(f"{verb}: path {text!r} is not a usable file name; pass a non-empty path.")
    return Path(text)


def _declaring(state, config: GPartConfig, extras: dict[str, torch.Tensor]) -> GPartConfig:
    """``config`` with the modules of every saved trainable tensor declared trainable.

    A file may only write tensors of modules it declares trainable (see :func:`load`), so a
    tensor made trainable by hand after ``apply`` gets its module declared. A module that holds
    a target cannot be declared (declared modules are never targets): that raises instead.
    """
    modules = [m for m in (n.rpartition(".")[0] for n in extras) if not name_matches(m, config.trainable)]
    if not modules:
        return config
    holding = sorted({m for m in modules if any(t.module_name == m for t in state.layout.targets)})
    if holding:
        raise StateError(
            f"trainable tensors of target modules {holding[:3]} cannot be saved: an adapter file may "
            "only write tensors of modules it declares trainable, and those modules hold targets. "
            "Freeze those tensors, or save with trainable=False (theta alone)."
        )
    declared = (*config.trainable, *dict.fromkeys(modules))
    return GPartConfig(**{**config.to_dict(), "trainable": declared})


def _is_sharded(t: torch.Tensor) -> bool:
    return callable(getattr(t, "full_tensor", None))  # a DTensor (FSDP2), without importing it


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathers a DTensor's shards (a collective: every rank must call)."""
    return t.full_tensor() if _is_sharded(t) else t


def write_file(
    path: Path,
    config: GPartConfig,
    entries: list,
    size: int,
    theta: torch.Tensor,
    extras: dict[str, torch.Tensor],
) -> Path:
    """The file for an adapter given by its parts (also used by format conversion)."""
    tensors = {_THETA: theta.detach().to("cpu", torch.float32, copy=True).contiguous()}
    tensors.update({EXTRA + n: t.detach().to("cpu", copy=True).contiguous() for n, t in extras.items()})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "gpart_version": __version__,
        "d": str(config.d),
        "seed": str(config.seed),
        "D": str(size),
        "config": json.dumps(_options(config), sort_keys=True),
        "targets": json.dumps(entries, separators=(",", ":")),
    }
    atomic_save(tensors, metadata, path)
    return path


def _options(config: GPartConfig) -> dict:
    """The ``config`` metadata: every setting but d and seed; the variant settings only when not
    the default, so a default adapter stays readable by earlier gpart."""
    options = {k: v for k, v in config.to_dict().items() if k not in ("d", "seed")}
    for key, default in _OPTIONAL.items():
        if options[key] == default:
            del options[key]
    return options


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it into place.

    A crash never leaves a half-written file; every OS error is a :class:`FormatError` naming
    the path and the fix.
    """
    if path.is_dir():
        raise FormatError(
            f"cannot save to {str(path)!r}: it is a folder; pass a file path inside it, e.g. "
            f"{str(path / 'adapter.safetensors')!r}."
        )
    if not path.parent.is_dir():
        raise FormatError(
            f"cannot save to {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first."
        )
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        raise FormatError(
            f"cannot save to {str(path)!r} ({type(err).__name__}: {err.strerror or err}); choose a "
            "folder you can write to, with free space."
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, after checking it is a readable gpart file.

    >>> import gpart
    >>> gpart.read("no/such/file.safetensors")
    Traceback (most recent call last):
    ...
    gpart.errors.FormatError: no adapter file at 'no/such/file.safetensors'; ...
    """
    path = as_path(path, "read")
    if not path.is_file():
        raise FormatError(f"no adapter file at {str(path)!r}; check the path (gpart.save writes one file).")
    tensors, metadata = read_safetensors(path, "gpart adapters are written by gpart.save")
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


def read_safetensors(path: Path, hint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file; any failure is a :class:`FormatError`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as err:  # safetensors raises its own error types, or OSError
        raise FormatError(
            f"{str(path)!r} is not a readable safetensors file ({type(err).__name__}: {err}); {hint}."
        ) from None
    return tensors, metadata


def load_json(text: str, where: str) -> object:
    """JSON ``text`` parsed; malformed or absurdly nested text is a :class:`FormatError`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise FormatError(
            f"{where} is not valid JSON ({type(err).__name__}: {str(err)[:200]}); the file was "
            "edited or truncated. Save the adapter again."
        ) from None


def excerpt(value: object) -> str:
    """``repr(value)``, cut short: a hostile file's value must not flood a message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def file_config(where: str, **settings: object) -> GPartConfig:
    """The settings read from a file, validated exactly as :func:`gpart.apply` validates them."""
    try:
        return make_config(**settings)
    except ConfigError as err:
        raise FormatError(f"{where} holds an invalid setting: {err}") from None


def _decimal(text: str, key: str, where: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,400}", text):
        raise FormatError(f"{where}: metadata {key}={text[:80]!r} is not an integer; the file was edited.")
    return int(text)


def name_ok(name: object) -> bool:
    """A usable qualified tensor name: a non-empty str that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(name, str) or not name:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _entries(raw: object, where: str) -> list[tuple[str, list[int]]]:
    """The ``targets`` metadata: ``[[name, shape], ...]`` with unique names and sizes >= 0."""
    problem = None
    if not isinstance(raw, list) or not raw:
        problem = "a non-empty list of [name, shape] pairs"
    else:
        for entry in raw:
            ok = isinstance(entry, list) and len(entry) == 2 and name_ok(entry[0])
            ok = ok and isinstance(entry[1], list)
            ok = ok and all(type(s) is int and 0 <= s < 1 << 62 for s in entry[1])
            if not ok:
                problem = f"[name, shape] pairs (names non-empty UTF-8, sizes >= 0), not {str(entry)[:80]}"
                break
    if problem is None and len({e[0] for e in raw}) != len(raw):
        problem = "unique target names"
    if problem is not None:
        raise FormatError(f"{where}: metadata 'targets' must hold {problem}; the file was edited.")
    return [(name, list(shape)) for name, shape in raw]


def parse_metadata(
    path: Path, metadata: dict[str, str]
) -> tuple[GPartConfig, list[tuple[str, list[int]]], int]:
    """Settings, target entries and D of a file's metadata, each checked as ``apply`` checks it."""
    where = repr(str(path))
    missing = [k for k in ("d", "seed", "D", "config", "targets") if k not in metadata]
    if missing:
        raise FormatError(f"{where} lacks gpart metadata {missing}; the file was edited. Save it again.")
    options = load_json(metadata["config"], f"{where} metadata 'config'")
    keys = {"isometric", "bias", "dropout", "init_bound", "trainable"}
    if not isinstance(options, dict) or set(options) - set(_OPTIONAL) != keys:
        found = sorted(options) if isinstance(options, dict) else type(options).__name__
        raise FormatError(
            f"{where}: metadata 'config' must hold exactly {sorted(keys)} (and optionally "
            f"{sorted(_OPTIONAL)}), found {found}."
        )
    if not isinstance(options["trainable"], list):
        raise FormatError(
            f"{where}: 'trainable' must be a list of module names, not {options['trainable']!r}."
        )
    config = file_config(
        where,
        d=_decimal(metadata["d"], "d", where),
        seed=_decimal(metadata["seed"], "seed", where),
        **options,
    )
    entries = _entries(load_json(metadata["targets"], f"{where} metadata 'targets'"), where)
    size = _decimal(metadata["D"], "D", where)
    counted = sum(math.prod(shape) for _, shape in entries)
    if size != counted:
        raise FormatError(f"{where}: D={size}, but its targets hold {counted} entries; the file was edited.")
    if config.d > size:
        raise FormatError(f"{where}: d={config.d} exceeds D={size}; the file was edited.")
    return config, entries, size


def check_theta(path: Path, tensors: dict[str, torch.Tensor], d: int) -> torch.Tensor:
    if _THETA not in tensors:
        raise FormatError(
            f"{str(path)!r} has no {_THETA!r} tensor (found {sorted(tensors)}); it is not a complete adapter."
        )
    unexpected = sorted(k for k in tensors if k != _THETA and not k.startswith(EXTRA))
    if unexpected:
        raise FormatError(
            f"{str(path)!r} holds unexpected tensors {unexpected}; a gpart file holds {_THETA!r} and "
            f"'{EXTRA}*' tensors only."
        )
    theta = tensors[_THETA]
    if theta.dtype != torch.float32 or theta.shape != (d,):
        raise FormatError(
            f"{str(path)!r}: theta has dtype {theta.dtype} and shape {tuple(theta.shape)}, but the "
            f"format requires float32 of shape ({d},) (d={d}). The file is corrupt; save it again."
        )
    check_finite(path, {_THETA: theta})
    return theta


def check_finite(where: object, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor floating-point and finite (a NaN in a file would poison the model silently)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise FormatError(
                f"{str(where)!r}: tensor {name!r} has dtype {t.dtype}; adapters hold floating-point "
                "tensors only. The file is corrupt; save it again."
            )
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise FormatError(
                f"{str(where)!r}: tensor {name!r} has {bad} NaN/inf entries; training diverged before "
                "saving. Use an earlier checkpoint or a lower learning rate."
            )


def _layout_differences(
    model_config: GPartConfig | None, model_entries: list, config: GPartConfig, entries: list
) -> list[str]:
    diffs = []
    if model_config is not None:
        for field in (
            "d",
            "seed",
            "isometric",
            "bias",
            "scope",
            "assignment",
            "projection",
            "block_containers",
        ):
            a, b = getattr(config, field), getattr(model_config, field)
            if a != b:
                diffs.append(f"{field}: file {a!r}, model {b!r}")
    for i, (a, b) in enumerate(zip_longest(entries, model_entries)):
        if a != b:
            diffs.append(f"target {i}: file {a}, model {b}")
    return diffs


def _missing_targets(model: nn.Module, entries: list[tuple[str, list[int]]]) -> list[str]:
    """One line per file target that the model lacks or holds in another shape."""
    params = dict(model.named_parameters())
    for module_name, module in model.named_modules():  # tensors other adapters parametrize
        for pname, plist in getattr(module, "parametrizations", {}).items():
            params.setdefault(f"{module_name}.{pname}".lstrip("."), plist.original)
    diffs = []
    for i, (name, shape) in enumerate(entries):
        param = params.get(name)
        if param is None:
            diffs.append(f"target {i}: {name!r} is not a parameter of the model")
        elif list(param.shape) != shape:
            diffs.append(f"target {i}: {name!r} has shape {shape} in the file, {list(param.shape)} here")
    return diffs


def fit_params(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    *,
    declared: Iterable[str],
    targets: Iterable[str],
    adapted: bool = False,
) -> tuple[dict[str, nn.Parameter], list[str]]:
    """The model's parameter for each named tensor, and one line per name an adapter file may not
    write: not a parameter, another shape, gpart's own state, a target's W0, a parameter outside
    the modules the file declares trainable, or (in an ``adapted`` model) a frozen parameter. A
    file must not change what it does not own."""
    declared, targets = tuple(declared), set(targets)
    params = dict(model.named_parameters())
    out, problems = {}, []
    for name, value in tensors.items():
        module = name.rpartition(".")[0]
        if name in targets or "parametrizations" in name.split("."):
            problems.append(f"{name!r} is a target's pretrained weight, which an adapter never writes")
        elif name.split(".")[0] in {state_attr(DEFAULT), *map(state_attr, adapter_states(model))}:
            problems.append(f"{name!r} is gpart's own state (theta is stored as {_THETA!r})")
        elif name not in params:
            problems.append(f"{name!r} is not a parameter of {type(model).__name__}")
        elif not name_matches(module, declared):
            problems.append(f"{name!r} is outside the modules the file declares trainable {list(declared)}")
        elif adapted and not params[name].requires_grad:
            problems.append(f"{name!r} is frozen in this model (make it trainable to load it)")
        elif params[name].shape != value.shape:
            problems.append(
                f"{name!r} has shape {tuple(value.shape)} in the file, {tuple(params[name].shape)} here"
            )
        else:
            out[name] = params[name]
    return out, problems


def stage_values(
    theta: torch.Tensor, extras: dict[str, tuple[nn.Parameter, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, list[tuple[nn.Parameter, torch.Tensor]]]:
    """Every value to write, already on its device and in its dtype: what can fail (memory) runs
    before the model changes, and the writes that follow allocate nothing."""
    staged = [(p, v.to(p.device, p.dtype)) for p, v in extras.values()]
    return theta.to(device, torch.float32), staged


def commit_values(model: nn.Module, install, theta: torch.Tensor, staged: list, name: str = DEFAULT) -> None:
    """``install()`` (None when adapted already), then theta and the saved tensors written in place."""
    with atomic(model):
        if install is not None:
            install()
        with torch.no_grad():
            adapter_state(model, name).theta.copy_(theta)
            for param, value in staged:
                param.copy_(value)


def load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str = DEFAULT,
    backend: Backend = "auto",
    recompute: bool = True,
) -> nn.Module:
    """Load an adapter file into ``model`` as the adapter ``name`` and return the model.

    Without an adapter of that name, applies one with the file's settings and target list first
    (``backend`` and ``recompute`` as in :func:`gpart.apply`; other adapters stay, and the new one
    becomes the active one). Into an existing adapter, it is a **hot swap**: the layout must
    match, and theta is copied in place (O(d): nothing registered again, nothing recompiled
    under ``torch.compile``). A file with another ``seed`` or ``d`` on the same targets also swaps
    in place (hashed partitions): the group sizes are recounted, the hash offsets and scales
    rewritten in place; with another ``d``, ``gpart.theta(model, name)`` is a new Parameter (an
    optimizer must be given the new one). Any other mismatch raises one :class:`LayoutError` that lists every
    difference, and leaves the model untouched. Besides theta, a file may only write parameters
    of the modules it declares trainable (e.g. a classification head), never a target's weight
    or any other frozen parameter.

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
    check_runtime(backend, recompute)
    name = check_name(name)
    path = as_path(path, "load")
    tensors, metadata = read(path)
    config, entries, _ = parse_metadata(path, metadata)
    theta = check_theta(path, tensors, config.d)
    extras = {k[len(EXTRA) :]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    check_finite(path, extras)
    state, swap = find_state(model, name), None
    if state is None:
        diffs = _missing_targets(model, entries)
        if not diffs:
            try:
                names = [n for n, _ in entries]
                plan = plan_adapter(
                    model, config, targets=None, target_parameters=(), exact=names, backend=backend, name=name
                )
            except GPartError as err:
                raise LayoutError(f"{str(path)!r} does not fit {type(model).__name__}: {err}") from None
            diffs = _layout_differences(None, plan.layout.entries(), config, entries)
    else:
        diffs = _layout_differences(state.config, state.layout.entries(), config, entries)
        if diffs and not _layout_differences(
            replace(state.config, **{f: getattr(config, f) for f in SWAPPABLE}),
            state.layout.entries(),
            config,
            entries,
        ):
            try:  # only seed and d differ: swap the partition in place
                swap = (installed_targets(model, state), plan_swap(model, state, config))
            except GPartError as err:
                raise LayoutError(f"{str(path)!r} cannot be swapped into adapter {name!r}: {err}") from None
            diffs = []
    if diffs:
        raise LayoutError(
            f"{str(path)!r} was saved for another layout ({len(diffs)} difference(s)): "
            + "; ".join(diffs)
            + ". Load it into the same architecture with the same targets and settings."
        )
    params, problems = fit_params(
        model, extras, declared=config.trainable, targets=[n for n, _ in entries], adapted=state is not None
    )
    if problems:
        raise LayoutError(
            f"{str(path)!r}: saved trainable tensors do not fit the model: "
            + "; ".join(problems)
            + ". Load into the architecture the adapter was trained on."
        )
    device = (state.theta if state is not None else plan.scale).device
    theta, staged = stage_values(theta, {n: (params[n], extras[n]) for n in params}, device)

    def install() -> None:
        install_adapter(model, plan, freeze=True, recompute=recompute)

    def reseed() -> None:
        swap_partition(state, swap[0], config, swap[1])

    commit_values(model, install if state is None else reseed if swap else None, theta, staged, name)
    return model
