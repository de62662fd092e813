"""Fuzzing: mutated adapter files, mutated reference folders and random ``apply`` arguments.

Whatever the input, a call either succeeds or raises a :class:`gpart.GPartError`; after a raise
the model is exactly as it was; after a success ``remove`` restores it bit for bit and ``merge``
keeps its function. The default suite runs a quick profile; ``make fuzz`` runs the long one
(``GPART_FUZZ=<cases per test>``, and ``GPART_FUZZ_REPORT=<file>`` writes the counts as JSON).
"""

from __future__ import annotations

import atexit
import collections
import json
import math
import os
import signal
import struct

import pytest
import torch
from conftest import assert_unchanged, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import gpart

CASES = int(os.environ.get("GPART_FUZZ", "40"))
HANG_SECONDS = 30
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=CASES <= 100,  # the quick profile is the same cases on every run
)
COUNTS: collections.Counter = collections.Counter()


def _report() -> None:
    path = os.environ.get("GPART_FUZZ_REPORT")
    if path and COUNTS:
        kinds = {key.partition(":")[0] for key in COUNTS}
        report = {
            f"{k}: {outcome}": 0 for k in kinds for outcome in ("other exception", "hang", "mutated model")
        }
        report.update(COUNTS)
        with open(path, "w") as f:
            json.dump(dict(sorted(report.items())), f, indent=1)


atexit.register(_report)


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).eval()


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))


class _Hang(Exception):
    pass


def _run(kind: str, model: nn.Module, call, *, written: frozenset | None = frozenset()) -> None:
    """Run ``call`` on ``model`` and check gpart's promises, whatever the outcome (``written``:
    the tensors an accepted call may change besides adapting; None: do not check a success)."""
    before = snapshot(model)

    def alarm(*_):
        raise _Hang(f"{kind}: no answer after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_SECONDS)
    try:
        call()
    except gpart.GPartError:
        COUNTS[f"{kind}: GPartError"] += 1
        try:
            assert_unchanged(model, before)
        except AssertionError:
            COUNTS[f"{kind}: mutated model"] += 1
            raise
        return
    except _Hang:
        COUNTS[f"{kind}: hang"] += 1
        raise
    except BaseException:
        COUNTS[f"{kind}: other exception"] += 1
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    COUNTS[f"{kind}: accepted"] += 1
    if written is not None:
        _check_adapted(model, before, written)


def _check_adapted(model: nn.Module, before: dict, written: frozenset) -> None:
    """An accepted call: merge keeps the function (on a copy), remove restores the rest bit for bit."""
    import copy

    with torch.no_grad():
        y = model(X)
        merged = gpart.merge(copy.deepcopy(model))
        torch.testing.assert_close(merged(X), y, rtol=0, atol=0, equal_nan=True)
    gpart.remove(model)
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert after["attrs"] == before["attrs"]
    assert [(n, i, r) for n, i, r, _ in after["params"]] == [(n, i, r) for n, i, r, _ in before["params"]]
    for (name, _, _, a), (_, _, _, b) in zip(after["params"], before["params"], strict=True):
        assert name in written or torch.equal(a, b), name


# ------------------------------------------------------------------------------- mutations

_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def _mutated_file(draw, data: bytes) -> bytes:
    """One mutation of a safetensors file: bytes, length, header fields, metadata, nesting."""
    kind = draw(
        st.sampled_from(["flip", "truncate", "tensor", "metadata", "metadata-json", "nest", "length"])
    )
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    header, body = _header(data)
    names = sorted(k for k in header if k != "__metadata__")
    meta = header.setdefault("__metadata__", {})
    if kind == "tensor":
        entry = header[draw(st.sampled_from(names))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if field == "dtype":
            entry["dtype"] = draw(
                st.sampled_from(["F16", "BF16", "F64", "I64", "I8", "BOOL", "U8", "F8_E4M3", "X"])
            )
        elif field == "shape":
            entry["shape"] = draw(st.lists(st.integers(0, 40), max_size=3))
        else:
            entry["data_offsets"] = draw(st.lists(st.integers(0, len(body) + 8), min_size=2, max_size=2))
    elif kind == "metadata":
        key = draw(st.sampled_from([*sorted(meta), "extra"]))
        if draw(st.booleans()) and key in meta:
            del meta[key]
        else:
            meta[key] = draw(st.text(max_size=20) | st.integers().map(str))
    elif kind == "metadata-json":
        key = draw(st.sampled_from(["config", "targets", "d", "D", "seed"]))
        meta[key] = json.dumps(draw(_JSON), allow_nan=True)
    elif kind == "nest":
        meta[draw(st.sampled_from(["config", "targets"]))] = _nested(draw(st.integers(500, 200_000)))
    else:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw + body
    return _pack(header, body)


@st.composite
def _edited_contents(draw, tensors: dict, metadata: dict) -> tuple[dict, dict]:
    """A valid safetensors file with gpart-level edits: values, extra tensors, settings."""
    tensors, metadata = dict(tensors), dict(metadata)
    kind = draw(st.sampled_from(["nonfinite", "extra", "drop", "config", "dtype"]))
    if kind == "nonfinite":
        name = draw(st.sampled_from(sorted(tensors)))
        t = tensors[name].clone().view(-1)
        t[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[name] = t.view(tensors[name].shape)
    elif kind == "extra":
        name = draw(
            st.sampled_from(["0.weight", "0.bias", "2.bias", "4.weight", "gpart.theta", "9.x", "4.bias"])
        )
        shape = draw(st.sampled_from([(12, 6), (12,), (3,), (10,), (3, 12), (1,)]))
        tensors["trainable." + name] = torch.ones(shape)
    elif kind == "drop":
        del tensors[draw(st.sampled_from(sorted(tensors)))]
    elif kind == "config":
        config = json.loads(metadata["config"])
        key = draw(st.sampled_from(["isometric", "bias", "dropout", "init_bound", "trainable"]))
        config[key] = draw(_JSON)
        metadata["config"] = json.dumps(config, allow_nan=True)
    else:
        name = draw(st.sampled_from(sorted(tensors)))
        tensors[name] = tensors[name].to(draw(st.sampled_from([torch.float16, torch.float64, torch.int32])))
    return tensors, metadata


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    model = gpart.apply(_base(), d=10, seed=5, targets=["0", "2"], trainable=["4"], init_bound=0.1)
    path = gpart.save(model, folder / "a.safetensors")
    peft = gpart.save_peft(model, folder / "ref")
    return folder, path, peft


def _written(path) -> frozenset:
    try:
        tensors, _ = gpart.read(path)
    except gpart.GPartError:
        return frozenset()
    return frozenset(k[len("trainable.") :] for k in tensors if k.startswith("trainable."))


@FUZZ
@given(data=st.data())
def test_mutated_gpart_files(adapter, data):
    folder, path, _ = adapter
    out = folder / "mutated.safetensors"
    if data.draw(st.booleans()):
        out.write_bytes(data.draw(_mutated_file(path.read_bytes())))
    else:
        tensors, metadata = gpart.read(path)
        tensors, metadata = data.draw(_edited_contents(tensors, metadata))
        save_file(tensors, str(out), metadata=metadata)
    into = data.draw(st.sampled_from(["plain", "adapted"]))
    model = _base()
    if into == "adapted":
        gpart.apply(model, d=10, seed=5, targets=["0", "2"], trainable=["4"])
    written = _written(out) if into == "plain" else None
    _run(f"load into {into}", model, lambda: gpart.load(model, out), written=written)


_PEFT_KEYS = [
    "d",
    "proj_seed",
    "target_modules",
    "bias",
    "isometric",
    "gpart_dropout",
    "init_bound",
    "modules_to_save",
    "peft_type",
    "assignment_backend",
    "layers_to_transform",
]


@FUZZ
@given(data=st.data())
def test_mutated_reference_folders(adapter, data, tmp_path_factory):
    _, _, peft = adapter
    folder = tmp_path_factory.mktemp("ref")
    config = json.loads((peft / "adapter_config.json").read_text())
    weights = (peft / "adapter_model.safetensors").read_bytes()
    kind = data.draw(st.sampled_from(["value", "drop", "text", "weights"]))
    text = None
    if kind == "value":
        config[data.draw(st.sampled_from(_PEFT_KEYS))] = data.draw(
            _JSON | st.sampled_from(["[", "0", "4", "", ["0"], ["4"], [""], ["(", "0"], 0, -1, 2**64])
        )
    elif kind == "drop":
        config.pop(data.draw(st.sampled_from(sorted(config))))
    elif kind == "text":
        text = data.draw(st.text(max_size=40) | st.integers(500, 100_000).map(_nested))
    else:
        weights = data.draw(_mutated_file(weights))
    (folder / "adapter_config.json").write_text(
        text if text is not None else json.dumps(config, allow_nan=True),
        encoding="utf-8",
        errors="surrogatepass",
    )
    (folder / "adapter_model.safetensors").write_bytes(weights)
    model = _base()
    written = frozenset(["4.weight", "4.bias"])
    _run("load_peft", model, lambda: gpart.load_peft(model, folder), written=written)


_NAMES = st.lists(st.sampled_from(["0", "2", "4", "1", "", "x", "0.weight", "[", ".*", "4.bias"]), max_size=3)


def _mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` nine times in ten: each argument is usually fine, so calls get deep."""
    return st.integers(0, 9).flatmap(lambda i: invalid if i == 0 else valid)


@FUZZ
@given(
    d=_mostly(
        st.integers(1, 300),
        st.one_of(
            st.integers(-3, 0), st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans()
        ),
    ),
    seed=_mostly(st.integers(-(2**70), 2**70), st.one_of(st.floats(), st.text(max_size=2), st.none())),
    targets=_mostly(
        st.sampled_from(["all-linear", ["0"], ["0", "2"], "0|2", ".*", ["2", "4"]]),
        st.one_of(_NAMES, st.sampled_from(["[", "", "(?P<", "nothing"]), st.none(), st.integers()),
    ),
    target_parameters=_mostly(
        st.sampled_from([(), ["4.bias"], ["0.bias", "2.weight"]]), st.one_of(_NAMES, st.integers())
    ),
    bias=_mostly(st.sampled_from(["none", "all"]), st.sampled_from(["bogus", None, 1])),
    isometric=_mostly(st.booleans(), st.sampled_from(["false", 0, None])),
    dropout=_mostly(
        st.floats(0.0, 0.9), st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=2))
    ),
    init_bound=_mostly(
        st.floats(0.0, 10.0),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 2**200)),
    ),
    trainable=_mostly(st.sampled_from([(), ["4"], "4"]), st.one_of(_NAMES, st.integers(), st.just(""))),
    freeze=_mostly(st.booleans(), st.sampled_from([None, 1])),
    recompute=_mostly(st.booleans(), st.just("yes")),
    scope=_mostly(st.sampled_from(["global", "global", "block"]), st.sampled_from(["layer", None])),
    assignment=_mostly(st.sampled_from(["hash", "hash", "generator", "signed_magnitude"]), st.just("stored")),
)
def test_random_apply_arguments(
    d,
    seed,
    targets,
    target_parameters,
    bias,
    isometric,
    dropout,
    init_bound,
    trainable,
    freeze,
    recompute,
    scope,
    assignment,
):
    kwargs = dict(
        d=d,
        seed=seed,
        targets=targets,
        target_parameters=target_parameters,
        bias=bias,
        isometric=isometric,
        dropout=dropout,
        init_bound=init_bound,
        trainable=trainable,
        freeze=freeze,
        recompute=recompute,
        scope=scope,
        assignment=assignment,
        backend="eager",
    )
    model = _base()
    _run("apply", model, lambda: gpart.apply(model, **kwargs))
