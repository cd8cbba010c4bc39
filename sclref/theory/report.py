"""What `sclref theory` shows: the STE x experiment table, the JSON record and the PNG plots.

Takes the dict returned by `sclref.theory.run`. The tables are Markdown; the JSON holds
every measurement as plain lists and numbers; the plots are rendered with matplotlib's
Agg backend into memory and written atomically. matplotlib is imported only when a plot
is drawn, so the table and the JSON work without it.
"""

from __future__ import annotations

import io as _io
import json
import platform
from pathlib import Path

import numpy as np

from sclref import storage
from sclref._version import __version__
from sclref.theory import CLASSES

__all__ = ["PLOTS", "diagnostic_table", "plots", "table", "to_json", "write"]

PLOTS = ("trajectories.png", "dead_fraction.png", "teacher.png", "chatter.png")
COLUMNS = [
    ("STE", "name"),
    ("declared", "principle declared by the estimator"),
    ("g' > 0", "surrogate positive on the grid and on hypothesis-drawn points in [-50, 50]"),
    ("g' <= 0 where", "zero set found on the grid and around hypothesis's counterexample, edges bisected"),
    ("1: crossed", "exp. 1, wrong-side starts that crossed to the right side and stayed"),
    ("1: max steps", "exp. 1, most steps any crossing took"),
    ("2: optimum", "exp. 2, runs that settled at the brute-force optimum"),
    ("2: dead", "exp. 2, mask variables frozen (g' = 0) on the wrong side"),
    ("2: unsettled", "exp. 2, runs whose mask was still changing at the step cap"),
    ("3: precision", "exp. 3, recovered connections that the teacher has (mean ± std over seeds)"),
    ("3: recall", "exp. 3, teacher connections recovered (mean ± std over seeds)"),
    ("3: kept", "exp. 3, connections kept per teacher connection (1.00: as many as the teacher)"),
    ("3: on-time", "exp. 3, fraction of the last epoch's steps a teacher connection was on (mean)"),
    ("3: frozen", "exp. 3, connections set wrong with g' = 0, per connection of the layer"),
    ("verdict", "classification from the measurements"),
]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _row(name: str, s: dict) -> list[str]:
    return [
        name, "yes" if s["declared"] else "no", "yes" if s["positive"] else "no", s["zero_set"],
        f"{s['single_crossed']}/{s['single_wrong_starts']}",
        "-" if s["single_max_steps"] is None else str(s["single_max_steps"]),
        _pct(s["planted_optimal"]), _pct(s["planted_dead"]), _pct(s["planted_unsettled"]),
        "n/a" if s["teacher_precision"] is None else f"{s['teacher_precision']:.2f} ± {s['teacher_precision_std']:.2f}",
        f"{s['teacher_recall']:.2f} ± {s['teacher_recall_std']:.2f}", f"{s['teacher_kept']:.2f}",
        f"{s['teacher_on_time']:.2f}",
        _pct(s["teacher_frozen"]), s["verdict"] + ("" if s["agrees"] else " (!)"),
    ]


def _markdown(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows[1:]])


def table(result: dict) -> str:
    """One Markdown table, a row per estimator and a column group per experiment.

    A verdict marked "(!)" disagrees with what the estimator declares about the principle.
    A note follows the table when hypothesis was not installed (the grid alone was checked).
    """
    out = _markdown([[c for c, _ in COLUMNS]] + [_row(name, result["summary"][name]) for name in result["stes"]])
    skipped = [n for n in result["stes"] if result["surrogates"][n].hypothesis_examples is None]
    if skipped:
        out += f"\n\nhypothesis search skipped (not installed) for: {', '.join(skipped)}; the grid alone was checked."
    return out


def _opt(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def diagnostic_table(result: dict) -> str:
    """The chatter diagnostic of experiment 2 as a Markdown table, a row per setting."""
    rows = [["g' on (s > 0)", "g' off (s <= 0)", "lr decay", "step cap", "optimum", "unsettled", "median steps",
             "chatter: time on", "chatter: |mean dL/dm|", "chatter: |mean step|/lr"]]
    for r in result["diagnostic"]:
        rows.append([f"{r['on']:g}", f"{r['off']:g}", f"{r['lr_decay']:g}", str(r["max_steps"]),
                     _pct(r["optimal_fraction"]),
                     _pct(r["unsettled_fraction"]), _opt(r["median_steps"], ".0f"), _opt(r["chatter_on"], ".3f"),
                     _opt(r["chatter_grad"], ".3f"), _opt(r["chatter_drift"], ".4f")])
    return _markdown(rows)


def _plain(value):
    """`value` with NumPy arrays and scalars turned into lists and Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)  # JSON has no inf/nan
    return value


def to_json(result: dict) -> dict:
    """Every measurement of `result` as JSON-ready values.

    Trajectories are left out (they are plotted), and so is the run time: the same seed
    gives the same JSON, byte for byte.
    """
    from importlib.metadata import version

    single = {name: {k: v for k, v in r.items() if k != "trajectory"} for name, r in result["single"].items()}
    # Per-variable arrays become per-run counts (window statistics are summarized as chatter_*):
    # the JSON stays small at a thousand runs.
    planted = {name: {k: (v.sum(axis=1) if isinstance(v, np.ndarray) and v.ndim == 2 else v)
                      for k, v in r.items() if k not in ("final", "window_on", "window_grad", "window_drift")}
               for name, r in result["planted"].items()}
    return _plain({
        "sclref": __version__, "numpy": version("numpy"), "python": platform.python_version(),
        "mode": result["mode"], "seed": result["seed"],
        "settings": result["settings"], "stes": result["stes"], "columns": dict(COLUMNS), "classes": CLASSES,
        "summary": result["summary"], "surrogates": result["surrogates"], "single_variable": single,
        "planted_mask": planted, "teacher": result["teacher"], "chatter_diagnostic": result["diagnostic"],
    })


def _grid(count: int):
    cols = min(count, 5)
    return -(-count // cols), cols


def _zero_bands(ax, intervals, low, high):
    """Shade the part of the s axis where the surrogate is 0 (the frozen region)."""
    for lo, hi in intervals:
        lo, hi = max(lo, low), min(hi, high)
        if lo < hi:
            ax.axhspan(lo, hi, color="0.85", zorder=0)


def _trajectories(result, plt):
    names = result["stes"]
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), sharex=True, sharey=True, squeeze=False)
    length = max(len(result["single"][name]["trajectory"]) for name in names)
    t = np.arange(1, length + 1)
    for ax, name in zip(axes.flat, names):
        r = result["single"][name]
        traj = r["trajectory"]  # (T+1, 2, K)
        # Every case is absorbed when a trajectory ends, so s keeps its last value for good.
        traj = np.concatenate([traj, np.repeat(traj[-1:], length - len(traj), axis=0)])
        starts = r["starts"]
        _zero_bands(ax, result["surrogates"][name].zero_set, starts.min() - 0.5, starts.max() + 0.5)
        for k in range(len(starts)):
            for j, (color, style) in enumerate((("tab:green", "-"), ("tab:red", "--"))):
                if r["wrong_start"][j, k]:  # a start already on the right side never moves
                    ax.plot(t, traj[:, j, k], color=color, ls=style, lw=1.2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_ylim(starts.min() - 0.5, starts.max() + 0.5)
        ax.set_title(f"{name}: {result['summary'][name]['verdict']}", fontsize=9)
        ax.set_xlabel("step + 1")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("mask variable s")
    fig.suptitle("Exp. 1: s from wrong-side starts (green: loss prefers on, red dashed: off; "
                 "grey: g'(s) = 0)", fontsize=9)
    fig.tight_layout()
    return fig


def _dead(result, plt):
    names = result["stes"]
    x = np.arange(len(names))
    s = [result["summary"][n] for n in names]
    single = [r["single_frozen"] / max(r["single_wrong_starts"], 1) for r in s]
    bars = [("exp. 1: wrong-side starts frozen", single),
            ("exp. 2: variables dead", [r["planted_dead"] for r in s]),
            ("exp. 2: runs unsettled", [r["planted_unsettled"] for r in s]),
            ("exp. 3: connections frozen wrong", [r["teacher_frozen"] for r in s])]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names)), 3.4))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Masks frozen on the wrong side, and runs unsettled at the cap, per estimator", fontsize=10)
    fig.tight_layout()
    return fig


def _teacher(result, plt):
    names = result["stes"]
    x = np.arange(len(names))
    s = [result["summary"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(names)), 3.4))
    width = 0.27
    for i, key in enumerate(("precision", "recall")):
        values = [np.nan if r[f"teacher_{key}"] is None else r[f"teacher_{key}"] for r in s]
        errors = [0.0 if r[f"teacher_{key}_std"] is None else r[f"teacher_{key}_std"] for r in s]
        left.bar(x + (i - 1) * width, values, width, yerr=errors, capsize=3, label=key)
    left.bar(x + width, [min(r["teacher_kept"], 1.5) for r in s], width, label="kept / teacher's")
    left.set_xticks(x, names)
    left.set_ylim(0, 1.55)
    left.legend(fontsize=8)
    left.set_title("Exp. 3: recovered connectivity vs teacher", fontsize=10)
    for name in names:
        runs = result["teacher"][name]
        recall = np.mean([[h["recall"] for h in r["history"]] for r in runs], axis=0)
        right.plot(np.arange(1, len(recall) + 1), recall, marker=".", label=name)
    right.set_xlabel("epoch")
    right.set_ylabel("recall (mean over seeds)")
    right.set_ylim(0, 1.05)
    right.legend(fontsize=8)
    right.set_title("Recall during training", fontsize=10)
    fig.tight_layout()
    return fig


def _chatter(result, plt):
    rows = result["diagnostic"]
    cap = min(r["max_steps"] for r in rows)
    labels = [f"{r['on']:g}/{r['off']:g}" + (f"\ndecay {r['lr_decay']:g}" if r["lr_decay"] else "")
              + (f"\n{r['max_steps'] // cap}x steps" if r["max_steps"] != cap else "") for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10.0, 1.9 * len(rows)), 3.6))
    left.bar(x - 0.2, [r["optimal_fraction"] for r in rows], 0.4, label="runs at the optimum")
    left.bar(x + 0.2, [r["unsettled_fraction"] for r in rows], 0.4, label="runs unsettled at the cap")
    left.set_ylim(0, 1.3)  # room for the legend above the bars
    left.set_title("Exp. 2 with g' = on/off slopes (leaky_relu: 1/0.1)", fontsize=10)
    right.bar(x - 0.2, [np.nan if r["chatter_on"] is None else r["chatter_on"] for r in rows], 0.4,
              label="time on of a flipping mask")
    right.bar(x + 0.2, [np.nan if r["chatter_grad"] is None else r["chatter_grad"] for r in rows], 0.4,
              label="|mean dL/dm| of a flipping mask")
    right.set_ylim(0, 1.3)
    right.set_title("Masks still flipping in the last steps before the cap", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(x, labels, fontsize=8)
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    return fig


def plots(result: dict) -> dict[str, bytes]:
    """The PNG files, named as in `PLOTS`, rendered in memory."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display needed, and none is touched
    import matplotlib.pyplot as plt

    out = {}
    for name, draw in zip(PLOTS, (_trajectories, _dead, _teacher, _chatter)):
        fig = draw(result, plt)
        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def write(result: dict, out_dir, with_plots: bool = True) -> list[Path]:
    """Write ``theory.json``, ``table.md`` and the plots to `out_dir`; return the paths written.

    Every file is rendered in memory before the first is written, and each is written
    atomically: a failure leaves no partial file.
    """
    out = Path(out_dir)
    text = f"{table(result)}\n\nChatter diagnostic (experiment 2):\n\n{diagnostic_table(result)}\n"
    files = {"theory.json": (json.dumps(to_json(result), indent=2) + "\n").encode(), "table.md": text.encode()}
    if with_plots:
        files.update(plots(result))
    for name, data in files.items():
        storage.atomic_write_bytes(out / name, data)
    return [out / name for name in files]
