"""Plots and tables from ``benchmarks/results/*.json`` into ``docs/``.

    python benchmarks/plot.py

Writes ``docs/bench_{step,partition,apply,io,bf16,native}.png`` (for whichever results exist) and
``docs/benchmarks.md`` with the tables, the machine and the commands that reproduce them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(os.environ.get("GPART_BENCH_RESULTS", Path(__file__).parent / "results"))
DOCS = Path(os.environ.get("GPART_BENCH_DOCS", Path(__file__).resolve().parents[1] / "docs"))


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def plot_step(res: dict, png: str) -> str:
    configs = list(res["configs"])
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 3.6), squeeze=False)
    lines = []
    for ax, config in zip(axes[0], configs, strict=True):
        summary = res["configs"][config]
        methods = list(summary)
        ax.bar(
            methods,
            [summary[m]["median_s"] for m in methods],
            color=["#999", "#c44", "#48c", "#b83", "#2a6"][: len(methods)],
        )
        ax.set_title(f"{config}: median step time")
        ax.set_ylabel("seconds")
        lines += [f"\n**{config}** ({res['args']['dtype']}, {res['args']['device']})\n"]
        lines += [
            "| method | step (s) | x full | x full per round [min, max] | x full, best step | x reference "
            "| x reference per round | x reference, best step | x floor | kept (MiB) "
            "| peak above frozen (MiB) | mem x reference |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            s = summary[m]
            label = m + (f" ({s['backend']})" if s.get("backend") else "")
            lines.append(
                f"| {label} | {s['median_s']:.3f} | {s.get('x_full', float('nan')):.3f} | "
                f"{_paired(s, 'full')} | {s.get('x_full_best', float('nan')):.3f} | "
                f"{s.get('x_reference', float('nan')):.3f} | {_paired(s, 'reference')} | "
                f"{s.get('x_reference_best', float('nan')):.3f} | "
                f"{s.get('x_floor', float('nan')):.3f} | "
                f"{s['persistent_mb']:.1f} | {s['peak_above_frozen_mb']:.1f} | "
                f"{s.get('mem_x_reference', float('nan')):.3f} |"
            )
    fig.tight_layout()
    fig.savefig(DOCS / png, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def _paired(s: dict, base: str) -> str:
    r = s.get(f"x_{base}_paired")  # absent in results written before per-round ratios existed
    return f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]" if r else "-"


def plot_partition(res: dict, png: str) -> str:
    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    names = list(rows)
    ax.barh(names, [1e3 * rows[n]["seconds"] for n in names], color="#48c")
    ax.set_xlabel("milliseconds (lower is better)")
    ax.set_title(f"delta path over D = {res['size']:,}, d = {res['d']:,}", fontsize=10)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(DOCS / png, dpi=110)
    plt.close(fig)
    lines = ["| operation | ms | throughput x memory copy |", "|---|---|---|"]
    lines += [f"| {n} | {1e3 * r['seconds']:.1f} | {r['x_copy']:.3f} |" for n, r in rows.items()]
    lines += ["", "| set-up counting, chunk | eager (ms) | compiled (ms) | speed-up |", "|---|---|---|---|"]
    for chunk, r in res["counting"].items():
        lines.append(
            f"| {int(chunk):,} | {1e3 * r['eager_s']:.1f} | {1e3 * r['compiled_s']:.1f} "
            f"| {r['speedup']:.2f} |"
        )
    return "\n".join(lines)


def plot_apply(res: dict, png: str) -> str:
    rows = res["rows"]
    for r in rows:
        r.setdefault("variant", "partition")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for backend in sorted({r["backend"] for r in rows}):
        rs = [r for r in rows if r["backend"] == backend and r["variant"] == "partition"]
        ax.loglog([r["D"] for r in rs], [r["seconds"] for r in rs], "o-", label=backend)
    ax.set_xlabel("D (target entries)")
    ax.set_ylabel("apply time (s)")
    ax.legend()
    ax.set_title("set-up time of gpart.apply")
    fig.tight_layout()
    fig.savefig(DOCS / png, dpi=110)
    plt.close(fig)
    lines = [
        "| D | d | targets | variant | kernel | apply (s) | transient peak (MiB) | persistent (B) "
        "| 8d + 8 per target (B) |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['D']:,} | {r['d']:,} | {r['targets']} | {r['variant']} | {r['backend']} | "
        f"{r['seconds']:.3f} | {r['transient_bytes'] / 2**20:.1f} | {r['persistent_bytes']:,} | "
        f"{r['bound']:,} |"
        for r in rows
    ]
    return "\n".join(lines)


def plot_io(res: dict, png: str) -> str:
    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ds = [r["d"] for r in rows]
    for key, label in (
        ("save_s", "save"),
        ("load_s", "load (adapted)"),
        ("load_plain_s", "load (plain: apply + load)"),
    ):
        ax.loglog(ds, [r[key] for r in rows], "o-", label=label)
    ax.set_xlabel("d")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.set_title("adapter file I/O")
    fig.tight_layout()
    fig.savefig(DOCS / png, dpi=110)
    plt.close(fig)
    lines = [
        "| d | save (ms) | load (ms) | load into plain (ms) | file (B) | file - 4d (B) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['d']:,} | {1e3 * r['save_s']:.2f} | {1e3 * r['load_s']:.2f} | {1e3 * r['load_plain_s']:.1f} | "
        f"{r['bytes']:,} | {r['bytes'] - r['theta_bytes']:,} |"
        for r in rows
    ]
    return "\n".join(lines)


def plot_bf16(res: dict, png: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, curve in res["curves"].items():
        ax.plot(range(len(curve)), curve, label=method, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(f"tiny bf16 Llama, d={res['args']['d']}, lr {res['args']['lr']}")
    fig.tight_layout()
    fig.savefig(DOCS / png, dpi=110)
    plt.close(fig)
    lines = [
        "| delta / W0 (std) | W entries changed | gpart effective-delta rel. error | reference rel. error |"
    ]
    lines += ["|---|---|---|---|"]
    lines += [
        f"| {r['delta_over_w0']:g} | {r['changed_fraction']:.4f} | {r['gpart_rel_error']:.4f} | "
        f"{r['reference_rel_error']:.4f} |"
        for r in res["survival"]
    ]
    curves = res["curves"]
    n = len(next(iter(curves.values())))
    lines += ["", "| steps | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for lo in range(0, n, 50):
        means = [sum(c[lo : lo + 50]) / len(c[lo : lo + 50]) for c in curves.values()]
        lines.append(f"| {lo}-{min(lo + 49, n - 1)} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    return "\n".join(lines)


def inference_table(res: dict, png: None = None) -> str:
    lines = ["| method | ms | x base |", "|---|---|---|"]
    lines += [f"| {k} | {1e3 * s['median_s']:.2f} | {s['x_base']:.3f} |" for k, s in res["summary"].items()]
    return "\n".join(lines)


def plot_native(res: dict, png: str) -> str:
    configs = list(res["configs"])
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 3.6), squeeze=False)
    lines = [
        f"C compiled with `{res['compiler']}`; every C result equals gpart's bit for bit (checked first)."
    ]
    for ax, config in zip(axes[0], configs, strict=True):
        r = res["configs"][config]
        rows = r["ns_per_entry"]
        names = [*rows, "gpart step work (2 x forward + sum)"]
        torch_ns = [rows[n]["torch"] for n in rows] + [r["gpart_step_work_ns"]["torch"]]
        c_ns = [rows[n].get("C", float("nan")) for n in rows] + [r["gpart_step_work_ns"]["C"]]
        y = range(len(names))
        ax.barh([i - 0.2 for i in y], torch_ns, height=0.4, color="#48c", label="torch / Inductor (shipped)")
        ax.barh([i + 0.2 for i in y], c_ns, height=0.4, color="#c44", label="AVX-512 C")
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ns per target entry (lower is better)")
        ax.set_title(f"{config}: D = {r['entries']:,}, d = {r['d']:,}", fontsize=10)
        ax.legend(fontsize=8)
        lines += [f"\n**{config}** ({r['targets']} targets of {tuple(r['shape'])}, d = {r['d']:,})\n"]
        lines += ["| ns per entry | torch / Inductor | AVX-512 C |", "|---|---|---|"]
        lines += [
            f"| {n} | {t:.2f} | {c:.2f} |".replace("| nan |", "| - |")
            for n, t, c in zip(names, torch_ns, c_ns, strict=True)
        ]
        f = r["forward_x_copy"]
        lines += [f"| forward, x copy | {f['torch']:.2f} | {f['C']:.2f} |"]
        lines += [
            f"| gpart work / {a} | {v['torch']:.2f} | {v['C']:.2f} |"
            for a, v in r["gpart_over_adamw"].items()
        ]
    fig.tight_layout()
    fig.savefig(DOCS / png, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def plot_overhead(res: dict, png: str) -> str:
    rows = res["rows"]
    methods = [m for m in rows[0] if m not in ("width", "targets", "steps", "full")]
    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 3.4), squeeze=False)
    for ax, width in zip(axes[0], widths, strict=True):
        sub = [r for r in rows if r["width"] == width]
        for m in methods:
            ax.plot([r["targets"] for r in sub], [r[m]["us_per_target"] for r in sub], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"Linear({width}, {width}) targets", fontsize=10)
        ax.set_xlabel("targets")
    axes[0][0].set_ylabel("extra us per target per step")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / png, dpi=110)
    plt.close(fig)
    lines = [
        f"Batch {res['batch']}, d = {res['d']}; extra host time per target per step (forward + backward) "
        "over the same model fully trainable, median over rounds [min, max].",
        "",
        "| width | targets | full step (ms) | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for r in rows:
        cells = " | ".join(
            f"{r[m]['us_per_target']:.1f} [{r[m]['us_per_target_spread'][0]:.0f}, "
            f"{r[m]['us_per_target_spread'][1]:.0f}]"
            for m in methods
        )
        lines.append(f"| {r['width']} | {r['targets']} | {r['full']['step_ms']:.2f} | {cells} |")
    lines += [
        "",
        "Profile (shares of a profiled step; extra tensor ops and compiled calls per target vs full):",
        "",
    ]
    lines += [
        "| method | extra tensor ops / target | compiled calls / target | tensor ops | autograd engine |"
    ]
    lines += ["|---|---|---|---|---|"]
    for p in res["profiles"][1:]:
        lines.append(
            f"| {p['method']} | {p['extra_aten_calls_per_target']:+.1f} | "
            f"{p['compiled_calls_per_target']:.2f} | {p['aten_share']:.0%} | "
            f"{p['autograd_engine_share']:.0%} |"
        )
    return "\n".join(lines)


def auto_table(res: dict, png: str) -> str:
    lines = [
        f"Total of a {res['steps']}-step run = set-up (`apply`) + first step + the rest at the median "
        "step; one fresh process each; peak RSS of the whole process.",
        "",
        "| D | kernel | set-up (s) | first step (s) | step (ms) | total (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['D']:,} | {r['variant']} | {r['setup_s']:.2f} | {r['first_step_s']:.2f} | "
            f"{1e3 * r['step_s']:.2f} | {r['total_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def convert_table(res: dict, png: str) -> str:
    lines = [
        "`python -m gpart convert REF_DIR OUT --model-config config.json` (median wall time; the "
        "rest of the command is starting Python and importing torch and transformers).",
        "",
        "| D | d | command (s) | meta model (s) | convert (s) |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['D']:,} | {r['d']:,} | {r['command_s']:.2f} | {r['meta_model_s']:.2f} | "
            f"{r['convert_s']:.3f} |"
        )
    return "\n".join(lines)


def variants_table(res: dict, png: str) -> str:
    lines = [
        "Median training step of each variant against the default partition (global scope, hashed "
        "ids), side by side in one run; stacks of q,v-targeted linears, AdamW on theta.",
        "",
        "| config | D | d | variant | step (ms) | x partition |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['config']} | {r['D']:,} | {r['d']:,} | {r['variant']} | {1e3 * r['step_s']:.2f} | "
            f"{r['x_partition']:.2f} |"
        )
    return "\n".join(lines)


def swap_table(res: dict, png: str) -> str:
    lines = [
        f"Switching a served model (`{res['config']}`, D = {res['D']:,}) to another adapter file, "
        f"d = {res['d']:,}: median wall time of `gpart.load` into the existing adapter, against "
        "removing it and loading the file as a new one.",
        "",
        "| case | time | x theta copy |",
        "|---|---|---|",
    ]
    floor = next(r["seconds"] for r in res["rows"] if r["case"] == "theta copy")
    for r in res["rows"]:
        t = r["seconds"]
        shown = f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"
        lines.append(f"| {r['case']} | {shown} | {t / floor:,.0f} |")
    return "\n".join(lines)


SECTIONS = [
    (
        "step",
        "Training step",
        "python benchmarks/bench_step.py --rounds 3 --steps 3",
        plot_step,
        "bench_step.png",
    ),
    (
        "overhead",
        "Fixed cost per target (small layers)",
        "python benchmarks/bench_overhead.py",
        plot_overhead,
        "bench_overhead.png",
    ),
    (
        "auto",
        "Eager or compiled: total time of a 300-step run",
        "python benchmarks/bench_auto.py",
        auto_table,
        None,
    ),
    (
        "partition",
        "Delta path and set-up counting",
        "python benchmarks/bench_partition.py",
        plot_partition,
        "bench_partition.png",
    ),
    (
        "partition_pow2",
        "Delta path, power-of-two d (the paper's LLM setting)",
        "python benchmarks/bench_partition.py --d 131072 --out partition_pow2",
        plot_partition,
        "bench_partition_pow2.png",
    ),
    (
        "apply",
        "Set-up (`apply`) as D grows",
        "python benchmarks/bench_apply.py",
        plot_apply,
        "bench_apply.png",
    ),
    ("io", "Adapter files", "python benchmarks/bench_io.py", plot_io, "bench_io.png"),
    (
        "variants",
        "Partition variants and Fastfood: step time",
        "python benchmarks/bench_variants.py",
        variants_table,
        None,
    ),
    (
        "convert",
        "Converting a reference folder (Llama-7B layout, D = 1.07e9)",
        "python benchmarks/bench_convert.py",
        convert_table,
        None,
    ),
    ("swap", "Hot swap of adapters", "python benchmarks/bench_swap.py", swap_table, None),
    ("inference", "Inference latency", "python benchmarks/bench_inference.py", inference_table, None),
    ("bf16", "bf16 bases", "python benchmarks/bench_bf16.py", plot_bf16, "bench_bf16.png"),
    (
        "native",
        "gpart's per-entry work: shipped kernels vs hand-written AVX-512 C (evidence, not shipped)",
        "python benchmarks/bench_native.py",
        plot_native,
        "bench_native.png",
    ),
    (
        "step_cuda",
        "Training step on a GPU (Qwen2-0.5B-shaped, bf16)",
        "python benchmarks/bench_step.py --configs qwen2-0.5b --dtype bfloat16 --device cuda "
        "--rounds 2 --steps 10 --warmup 3 --out step_cuda",
        plot_step,
        "bench_step_cuda.png",
    ),
    (
        "partition_cuda",
        "Delta path on a GPU",
        "python benchmarks/bench_partition.py --targets 28 --shape 4096 4096 --d 131072 --device cuda "
        "--repeats 5 --profile --out partition_cuda",
        plot_partition,
        "bench_partition_cuda.png",
    ),
]


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/plot.py` from `benchmarks/results/*.json`. Every number is a "
        "median over repeats, measured side by side in one run; ratios matter, absolute times vary "
        "by machine.",
    ]
    machine_written = False
    for name, title, command, fn, png in SECTIONS:
        res = load(name)
        if res is None:
            continue
        if not machine_written:
            m = res["machine"]
            parts += [
                "",
                f"Machine: {m['processor']}, {m['cpus']} CPUs, {m['threads']} torch threads, "
                f"torch {m['torch']}, gpart {m['gpart']}, {m['platform']}"
                + (f", GPU {m['cuda']}" if m.get("cuda") else "")
                + ".",
            ]
            machine_written = True
        parts += ["", f"## {title}", "", f"Reproduce: `{command}`"]
        if res["machine"].get("cuda"):
            m = res["machine"]
            parts += ["", f"Machine: GPU {m['cuda']}, {m['cpus']} CPUs, torch {m['torch']}."]
        parts += ["", fn(res, png)]
        if png:
            parts += ["", f"![{title}]({png})"]
    (DOCS / "benchmarks.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
