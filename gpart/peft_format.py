"""The authors' adapter directory (their PEFT fork): read it into gpart, write gpart adapters as it.

A directory written by the reference implementation's ``save_pretrained`` holds:

* ``adapter_config.json``: ``peft_type: "GPART"``, ``d``, ``proj_seed``, ``target_modules``
  (PEFT rules: a list of exact-or-dotted-suffix names, or one regex), ``bias``, ``isometric``,
  ``gpart_dropout``, ``init_bound``, ``modules_to_save`` and the choice of algorithm
  (``assignment_backend: "stateless"``, ``projection_type: "partition"``, ...);
* ``adapter_model.safetensors``: theta as ``base_model.gpart_theta_d`` and the saved modules'
  parameters as ``base_model.model.<qualified name>``.

gpart implements every variant the reference offers (global or block scope; hashed, generator-drawn
or signed-magnitude ids; the Fastfood projection), so the same settings give the same weights:
:func:`load_peft` applies gpart with the directory's settings and loads theta and the head.
``layers_to_transform``/``layers_pattern`` select targets as PEFT does, and the reference's
``bias="*_only"`` modes partition biases as ``"all"``; with ``partition_scope="transformer_block"``
``layers_pattern`` names the block containers (``block_containers``). Settings gpart does not
implement (unknown values) raise :class:`~gpart.FormatError` instead of loading something else.
Dropout masks differ (the reference draws them from torch's RNG, gpart from a hash), which
matters only when training continues.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .core import (
    DEFAULT,
    adapter_state,
    check_name,
    check_runtime,
    find_state,
    install_adapter,
    plan_adapter,
    trainable_outside_adapters,
)
from .errors import FormatError, LayoutError, StateError
from .parametrization import Backend, GPartConfig
from .serialization import (
    EXTRA,
    as_path,
    atomic_save,
    atomic_write,
    check_finite,
    check_theta,
    commit_values,
    excerpt,
    file_config,
    fit_params,
    load_json,
    name_ok,
    parse_metadata,
    read,
    read_safetensors,
    stage_values,
    write_file,
)
from .targets import linear_types, name_matches

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_peft", "read_peft", "save_peft"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_THETA_KEY = "base_model.gpart_theta_d"
_PREFIX = "base_model.model."
_WRAPPED = ".modules_to_save.default."  # stock PEFT's name for a saved module's copy

# Settings that select the algorithm: gpart implements exactly these values (None = absent).
_REQUIRED = {
    "peft_type": ("GPART",),
    "assignment_backend": ("stateless", "materialized", None),
    "projection_type": ("partition", "fastfood", None),
    "grouping_strategy": ("random", "signed_magnitude", None),
    "partition_scope": ("global", "transformer_block", None),
}


def read_peft(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(apply_kwargs, tensors)`` of a reference adapter directory, after checking every setting.

    ``apply_kwargs`` are :func:`gpart.apply`'s keywords for the same adapter (``d``, ``seed``,
    ``targets``, ``bias``, ``isometric``, ``dropout``, ``init_bound``, ``trainable``); ``tensors``
    maps ``"theta"`` and the saved parameters' qualified names to tensors.

    >>> import gpart
    >>> gpart.read_peft("no/such/dir")
    Traceback (most recent call last):
    ...
    gpart.errors.FormatError: 'no/such/dir' has no adapter_config.json; ...
    """
    directory = as_path(directory, "read_peft")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise FormatError(
            f"{str(directory)!r} has no {CONFIG_FILE}; pass the folder that save_pretrained wrote "
            f"(it holds {CONFIG_FILE} and {WEIGHTS_FILE})."
        )
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FormatError(f"{str(config_path)!r} is not a readable UTF-8 text file ({err}).") from None
    kwargs = _kwargs_from_config(config_path, load_json(text, repr(str(config_path))))
    if not weights_path.is_file():
        raise FormatError(f"{str(directory)!r} has {CONFIG_FILE} but no {WEIGHTS_FILE}; copy both files.")
    stored, _ = read_safetensors(weights_path, "the reference writes it with save_pretrained")
    return kwargs, _tensors(weights_path, stored, kwargs["d"])


def _kwargs_from_config(path: Path, raw: object) -> dict:
    where = repr(str(path))
    if not isinstance(raw, dict):
        raise FormatError(f"{where} holds {type(raw).__name__}, expected a JSON object.")
    for key, allowed in _REQUIRED.items():
        if raw.get(key) not in allowed:
            supported = [a for a in allowed if a is not None]
            raise FormatError(
                f"{where}: {key}={excerpt(raw.get(key))} is not supported; gpart implements "
                f"{key} in {supported} (the reference's defaults). Retrain with those settings."
            )
    targets = raw.get("target_modules")
    if not (name_ok(targets) or (isinstance(targets, list) and targets and all(name_ok(t) for t in targets))):
        raise FormatError(
            f"{where}: target_modules={excerpt(targets)}; gpart needs the explicit list of module "
            "names (or one regex) the adapter was trained with, not a model-type default."
        )
    layers, pattern = raw.get("layers_to_transform"), raw.get("layers_pattern")
    scope = "block" if raw.get("partition_scope") == "transformer_block" else "global"
    stored = raw.get("assignment_backend") == "materialized"
    if raw.get("grouping_strategy") == "signed_magnitude" and not stored:
        raise FormatError(
            f"{where}: grouping_strategy='signed_magnitude' needs assignment_backend='materialized' "
            "(the reference rejects it otherwise); the folder is inconsistent."
        )
    assignment = (
        "signed_magnitude"
        if raw.get("grouping_strategy") == "signed_magnitude"
        else "generator"
        if stored
        else "hash"
    )
    # The reference locates blocks under layers_pattern's names when given (exact components).
    containers = ([pattern] if isinstance(pattern, str) else pattern) if scope == "block" and pattern else []
    if layers not in (None, []) and isinstance(targets, list):  # PEFT ignores them for a regex
        targets = _LayerFilter.parse(where, targets, layers, pattern)
    saved = raw.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(name_ok(m) for m in saved)):
        raise FormatError(
            f"{where}: modules_to_save={excerpt(saved)} must be a list of module names or null."
        )
    for key in ("d", "proj_seed"):
        if key not in raw:
            raise FormatError(
                f"{where}: the setting {key!r} is missing; the file is not a complete adapter config."
            )
    config = file_config(
        where,
        d=raw["d"],
        seed=raw["proj_seed"],
        bias=_bias(raw.get("bias", "none")),
        isometric=raw.get("isometric", True),
        dropout=raw.get("gpart_dropout", 0.0),
        init_bound=raw.get("init_bound", 0.0),
        trainable=saved or [],
        scope=scope,
        assignment="hash" if raw.get("projection_type") == "fastfood" else assignment,
        projection=raw.get("projection_type") or "partition",
        block_containers=containers,
    )
    return {**config.to_dict(), "targets": targets}


def _bias(value: object) -> object:
    """The reference's bias mode as gpart's: every ``*_only`` value partitions the biases as "all"
    does (the reference's index spaces and deltas are identical); others are checked by apply's rules."""
    return "all" if isinstance(value, str) and value.endswith("_only") else value


class _LayerFilter:
    """PEFT's target rule with ``layers_to_transform``: a callable ``targets`` for :func:`gpart.apply`.

    A module is a target if its name equals an entry of ``modules`` (the layer filter does not
    apply then), or ends with ``"." + entry`` and its layer index is kept. The layer index is the
    number after the last ``.<pattern>.`` (any container when no pattern is given) followed by a
    dot, for the first pattern that matches, exactly as PEFT reads it.
    """

    def __init__(self, modules: list[str], layers: tuple[int, ...], patterns: tuple[str, ...]) -> None:
        self.modules, self.layers, self.patterns = modules, layers, patterns
        self.regexes = [re.compile(rf".*\.{p}\.(\d+)\.") for p in patterns] or [
            re.compile(r".*\.[^.]*\.(\d+)\.")
        ]

    @classmethod
    def parse(cls, where: str, modules: list, layers: object, pattern: object) -> _LayerFilter:
        layers = [layers] if type(layers) is int else layers
        patterns = [pattern] if isinstance(pattern, str) else pattern if pattern is not None else []
        if not (isinstance(layers, list) and all(type(i) is int for i in layers)):
            raise FormatError(
                f"{where}: layers_to_transform={excerpt(layers)} must be an int or a list of ints."
            )
        if not (isinstance(patterns, list) and all(isinstance(p, str) and p for p in patterns)):
            raise FormatError(
                f"{where}: layers_pattern={excerpt(pattern)} must be a name, a list of names or null."
            )
        try:
            return cls(list(modules), tuple(layers), tuple(patterns))
        except re.error as err:
            raise FormatError(
                f"{where}: layers_pattern={excerpt(pattern)} is not a valid regex ({err})."
            ) from None

    def __call__(self, name: str, module: nn.Module) -> bool:
        if name in self.modules:
            return True
        if not any(name.endswith("." + m) for m in self.modules):
            return False
        for regex in self.regexes:
            found = regex.match(name)
            if found is not None:
                return int(found.group(1)) in self.layers
        return False

    def __repr__(self) -> str:
        return f"{self.modules} in layers {list(self.layers)} (layers_pattern {list(self.patterns) or None})"


def _tensors(path: Path, stored: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    if _THETA_KEY not in stored:
        raise FormatError(f"{str(path)!r} has no {_THETA_KEY!r} tensor (found {sorted(stored)}).")
    theta = stored.pop(_THETA_KEY)
    if theta.shape != (d,) or not theta.is_floating_point():
        raise FormatError(
            f"{str(path)!r}: {_THETA_KEY} has shape {tuple(theta.shape)} and dtype {theta.dtype}; "
            f"adapter_config.json says d={d}. The two files do not belong together."
        )
    out = {"theta": theta.float()}
    for key, value in stored.items():
        if not key.startswith(_PREFIX) or len(key) == len(_PREFIX):
            raise FormatError(
                f"{str(path)!r}: unexpected tensor {key!r}; a GPart adapter holds {_THETA_KEY!r} and "
                f"'{_PREFIX}*' parameters of the saved modules only."
            )
        out[key[len(_PREFIX) :].replace(_WRAPPED, ".")] = value
    check_finite(path, out)
    return out


def load_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    name: str = DEFAULT,
    backend: Backend = "auto",
    recompute: bool = True,
) -> nn.Module:
    """Apply gpart to ``model`` with a reference adapter's settings and load its theta and head.

    ``model`` is the base model (e.g. the ``transformers`` model the adapter was trained on), plain
    or carrying other adapters; the new adapter is named ``name`` and becomes the active one.
    ``backend`` and ``recompute`` are as in :func:`gpart.apply`. Besides theta, the folder may
    only write parameters of its ``modules_to_save``. On any error the model is left unchanged.
    Afterwards the model is an ordinary gpart model: :func:`gpart.merge`, :func:`gpart.save`,
    training.

    >>> import tempfile, torch, gpart
    >>> def base_model():
    ...     torch.manual_seed(0)
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> model = gpart.apply(base_model(), d=3, seed=7, targets=["0"], trainable=["1"], init_bound=0.1)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     fresh = gpart.load_peft(base_model(), gpart.save_peft(model, tmp))
    >>> torch.equal(fresh(torch.ones(1, 4)), model(torch.ones(1, 4)))
    True
    """
    check_runtime(backend, recompute)
    if find_state(model, check_name(name)) is not None:
        again = "gpart.remove(model)" if name == DEFAULT else f"gpart.remove(model, name={name!r})"
        raise StateError(
            f"{type(model).__name__} already has a gpart adapter named {name!r}; load_peft applies "
            f"one. Pass another name=, the plain base model, or call {again} first."
        )
    kwargs, tensors = read_peft(directory)
    plan, extras = _fit(model, directory, kwargs, tensors, backend=backend, name=name)
    theta, staged = stage_values(tensors["theta"], extras, plan.scale.device)

    def install() -> None:
        install_adapter(model, plan, freeze=True, recompute=recompute)

    commit_values(model, install, theta, staged, name)
    return model


def _fit(
    model: nn.Module, directory, kwargs: dict, tensors: dict, *, backend: str | None, name: str = DEFAULT
):
    """The settings, plan and saved parameters of a folder, checked against ``model``.

    Returns ``(plan, {name: (parameter, value)})``; with ``backend=None`` the plan stops at the
    layout (no scales, nothing hashed).
    """
    modules = [n for n, _ in model.named_modules()]
    # PEFT ignores modules_to_save entries that match nothing (e.g. "score" on an encoder).
    trainable = [m for m in kwargs["trainable"] if any(name_matches(n, (m,)) for n in modules if n)]
    settings = {k: v for k, v in kwargs.items() if k != "targets"}
    config = GPartConfig(
        **{**settings, "trainable": tuple(trainable), "block_containers": tuple(settings["block_containers"])}
    )
    plan = plan_adapter(
        model,
        config,
        targets=kwargs["targets"],
        target_parameters=(),
        backend=backend or "eager",
        scales=backend is not None,
        name=name,
    )
    extras = {k: v for k, v in tensors.items() if k != "theta"}
    params, problems = fit_params(
        model, extras, declared=config.trainable, targets=[t.name for t in plan.layout.targets]
    )
    if problems:
        raise LayoutError(
            f"{str(directory)!r} does not fit the model: " + "; ".join(problems) + ". Load it into "
            "the architecture it was trained on (same head size, e.g. num_labels)."
        )
    return plan, {n: (params[n], extras[n]) for n in params}


def to_gpart_file(directory: str | os.PathLike, model: nn.Module, path: str | os.PathLike) -> Path:
    """Convert a reference adapter directory into a gpart file, for the architecture of ``model``.

    ``model`` only supplies the layout (names and shapes): it is not modified, and a model on
    the ``meta`` device (no memory, no weights) is enough. Nothing is hashed: a 7B model's layout
    takes well under a second.
    """
    path = as_path(path, "convert")
    kwargs, tensors = read_peft(directory)
    plan, extras = _fit(model, directory, kwargs, tensors, backend=None)
    values = {n: v for n, (_, v) in extras.items()}
    return write_file(path, plan.config, plan.layout.entries(), plan.layout.size, tensors["theta"], values)


def from_gpart_file(path: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Convert a gpart file into a reference adapter directory (no model needed).

    The file records target names and shapes, not module types: every target must be the
    ``weight`` (or ``bias``) of a module with a 2-D weight, which the reference adapts only for
    ``nn.Linear``/``Conv1D``; that the modules are of those types is the caller's responsibility
    (:func:`save_peft` checks it on a live model).
    """
    path = as_path(path, "convert")
    tensors, metadata = read(path)
    config, entries, _ = parse_metadata(path, metadata)
    theta = check_theta(path, tensors, config.d)
    dims = {name: len(shape) for name, shape in entries}
    bad = [
        n
        for n, k in dims.items()
        if not (
            (n.endswith(".weight") and k == 2)
            or (n.endswith(".bias") and k == 1 and dims.get(n[: -len("bias")] + "weight") == 2)
        )
    ]
    if bad:
        raise FormatError(
            f"cannot convert {str(path)!r} to the reference format: {bad[:3]} are not 2-D module "
            "weights (or their biases), and the reference adapts Linear/Conv1D weights only."
        )
    extras = {k[len(EXTRA) :]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    modules = [n.rpartition(".")[0] for n, _ in entries]
    return _write_peft(as_path(directory, "convert"), config, modules, theta, extras)


def save_peft(
    model: nn.Module, directory: str | os.PathLike, *, task_type: str | None = None, name: str = DEFAULT
) -> Path:
    """Write ``model``'s adapter ``name`` as a reference adapter directory; return the directory.

    The reference adapts ``nn.Linear`` (and GPT-2 ``Conv1D``) weights only, so an adapter with
    other targets (embeddings, convolutions, raw parameters) raises :class:`~gpart.FormatError`.
    Target modules are written as their full names, which PEFT matches exactly; trainable
    parameters (e.g. a classification head) are saved like ``modules_to_save``.

    >>> import tempfile, torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     sorted(p.name for p in gpart.save_peft(model, tmp).iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    directory = as_path(directory, "save_peft")
    state = adapter_state(model, name)
    linear = linear_types()
    bad = [
        t.name
        for t in state.layout.targets
        if not isinstance(model.get_submodule(t.module_name), linear)
        or t.param_name not in ("weight", "bias")
    ]
    if bad:
        raise FormatError(
            f"cannot export to the reference format: {bad[:3]}{' ...' if len(bad) > 3 else ''} are not "
            "weights/biases of nn.Linear or Conv1D modules, which is all the reference adapts. Keep "
            "this adapter in gpart's own format (gpart.save)."
        )
    conv1d = any(type(model.get_submodule(t.module_name)).__name__ == "Conv1D" for t in state.layout.targets)
    extras = trainable_outside_adapters(model)
    return _write_peft(
        directory,
        state.config,
        [t.module_name for t in state.layout.targets],
        state.theta,
        extras,
        fan_in_fan_out=conv1d,
        task_type=task_type,
        base=getattr(getattr(model, "config", None), "_name_or_path", "") or "",
    )


def _write_peft(
    directory: Path,
    config: GPartConfig,
    target_modules: list[str],
    theta: torch.Tensor,
    extras: dict[str, torch.Tensor],
    *,
    fan_in_fan_out: bool = False,
    task_type: str | None = None,
    base: str = "",
) -> Path:
    if directory.exists() and not directory.is_dir():
        raise FormatError(
            f"cannot write a reference adapter folder at {str(directory)!r}: a file of that name "
            "exists. Pass a new or existing folder."
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FormatError(
            f"cannot create {str(directory)!r} ({type(err).__name__}: {err.strerror or err}); choose a "
            "folder you can write to."
        ) from None
    saved_modules = list(dict.fromkeys(n.rpartition(".")[0] for n in extras))
    settings = {
        "assignment_backend": "stateless" if config.assignment == "hash" else "materialized",
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "bias": config.bias,
        "d": config.d,
        "fan_in_fan_out": fan_in_fan_out,
        "gpart_dropout": config.dropout,
        "grouping_strategy": "signed_magnitude" if config.assignment == "signed_magnitude" else "random",
        "inference_mode": True,
        "init_bound": config.init_bound,
        "isometric": config.isometric,
        "layers_pattern": list(config.block_containers) or None,
        "layers_to_transform": None,
        "modules_to_save": list(dict.fromkeys([*config.trainable, *saved_modules])) or None,
        "partition_scope": "transformer_block" if config.scope == "block" else "global",
        "peft_type": "GPART",
        "projection_type": config.projection,
        "proj_seed": config.seed,
        "revision": None,
        "target_modules": list(dict.fromkeys(target_modules)),
        "task_type": task_type,
    }
    tensors = {_THETA_KEY: theta.detach().to("cpu", torch.float32, copy=True).contiguous()}
    tensors.update({_PREFIX + n: t.detach().to("cpu", copy=True).contiguous() for n, t in extras.items()})
    atomic_save(tensors, {"format": "pt"}, directory / WEIGHTS_FILE)
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory
