"""Generate the documentation artefacts: ``docs/method.png`` and ``docs/api.md``.

    python docs/make_docs.py

``api.md`` is built from the docstrings of every name in ``gpart.__all__`` (a test checks it is
up to date); ``method.png`` draws a real partition: how each entry of theta reaches weights in
every target tensor.
"""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path

import torch

import gpart
from gpart import parametrization
from gpart.partition import group_counts, group_ids

DOCS = Path(__file__).parent


def api_markdown() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/make_docs.py`; every example below is run by",
        "the test suite (`pytest --doctest-modules`). Everything public is importable from `gpart`.",
    ]
    sections = {"Verbs": [], "Files": [], "Types": [], "Errors": []}
    for name in gpart.__all__:
        obj = getattr(gpart, name)
        if name == "__version__":
            continue
        if inspect.isclass(obj) and issubclass(obj, Exception):
            sections["Errors"].append((name, obj))
        elif inspect.isclass(obj):
            sections["Types"].append((name, obj))
        elif name in ("save", "load", "read", "save_peft", "load_peft", "read_peft"):
            sections["Files"].append((name, obj))
        else:
            sections["Verbs"].append((name, obj))
    for title, entries in sections.items():
        lines += ["", f"## {title}"]
        for name, obj in entries:
            signature = "" if title == "Errors" else _signature(obj)
            lines += ["", f"### `gpart.{name}{signature}`", "", inspect.cleandoc(obj.__doc__ or "")]
    lines += ["", f"`gpart.__version__` = `{gpart.__version__!r}` (single source: `gpart/_version.py`)."]
    lines += ["", "Command line: `python -m gpart --help` (see `gpart/cli.py`)."]
    return "\n".join(lines) + "\n"


# The option types by name, shown with their values: `Scope` reads as Literal['global', 'block'].
_OPTION_TYPES = {
    name: f"Literal[{', '.join(map(repr, typing.get_args(getattr(parametrization, name))))}]"
    for name in ("Assignment", "Backend", "Bias", "Projection", "Scope")
}


class _Raw(str):
    """An annotation string shown as written (``int``, not ``'int'``)."""

    def __repr__(self) -> str:
        return str(self)


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""

    def raw(a):
        return _Raw(_OPTION_TYPES.get(a, a)) if isinstance(a, str) else a

    params = [p.replace(annotation=raw(p.annotation)) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=raw(sig.return_annotation)))


def method_figure(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    d, seed = 6, 3
    shapes = [(4, 6), (4, 6), (3, 6)]
    names = ["layer0.query.weight", "layer0.value.weight", "layer1.query.weight"]
    size = sum(r * c for r, c in shapes)
    ids = group_ids(0, size, d=d, seed=seed)
    counts = group_counts(size, d=d, seed=seed)
    cmap = ListedColormap(plt.get_cmap("tab10").colors[:d])
    fig = plt.figure(figsize=(11, 4.2))
    grid = fig.add_gridspec(2, 4, height_ratios=[1, 4], width_ratios=[1.1, 1, 1, 1])
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(torch.arange(d).view(d, 1).numpy(), cmap=cmap, vmin=-0.5, vmax=d - 0.5)
    for j in range(d):
        ax.text(0, j, f"theta[{j}]\nn={int(counts[j])}", ha="center", va="center", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"theta (d = {d})", fontsize=10)
    offset = 0
    for k, ((rows, cols), name) in enumerate(zip(shapes, names, strict=True)):
        ax = fig.add_subplot(grid[1, k + 1])
        block = ids[offset : offset + rows * cols].view(rows, cols)
        ax.imshow(block.numpy(), cmap=cmap, vmin=-0.5, vmax=d - 0.5)
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, str(offset + r * cols + c), ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}\nentries {offset}..{offset + rows * cols - 1}", fontsize=8)
        offset += rows * cols
    text = fig.add_subplot(grid[0, 1:])
    text.axis("off")
    text.text(
        0.5,
        0.5,
        f"global index i (numbers) -> group g(i) = splitmix64(seed + i) mod d (colour);  "
        f"D = {size}, seed = {seed}\n"
        "W[i] = W0[i] + theta[g(i)] / sqrt(n_g(i)):  every theta entry moves weights in every target tensor",
        ha="center",
        va="center",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: Path = DOCS) -> None:
    (out / "api.md").write_text(api_markdown())
    method_figure(out / "method.png")
    print(f"wrote {out / 'api.md'} and {out / 'method.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS)
