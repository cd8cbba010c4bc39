"""The results experiment: SCL against dense training and magnitude pruning, several seeds, one store.

For each model, seed and method, `reproduce` trains on the same data with the same epoch
budget (``epochs`` where SCL learns masks + ``finetune_epochs`` where it fine-tunes θ):

- ``dense``: the plain network, no masks;
- ``scl_identity``, ``scl_leaky_relu``, ``scl_softplus``: SCL with that STE, one λ for all;
- ``magnitude``: magnitude pruning + retraining (`sclref.pruning`) to the per-layer
  sparsity that ``scl_identity`` reached with the same seed;
- ``scl_identity_flops`` (not run by default): SCL identity with the FLOPs-weighted
  regularizer, each connection counted as often as it is used per sample;
- ``scl_identity_no_norm``: the ablation, SCL identity without per-feature normalization;
- ``scl_identity_global_scale`` (not run by default): the fairer ablation, no per-feature
  normalization but one global scale c in its place: λ·c and mask lr / c, so that the
  mask variables move as far as in SCL while features stay unbalanced;
- ``magnitude_global`` (not run by default): one global magnitude threshold at the
  overall sparsity of ``scl_identity``.

Every run trains in its own directory under ``<out>/runs`` (named by its settings' hash),
checkpointing every epoch, through `sclref.experiments.execute`: serially, on a local Dask
cluster or on a cluster given by its scheduler's address. The run directories are the
store: a finished run is never trained again and an interrupted one continues from its
last epoch. ``<out>/results.json`` holds one record per run, read from its directory.
`summarize` turns the runs into mean ± std over seeds of the *final-epoch* test error,
sparsity overall and per layer, FLOPs and mask flips; `markdown` prints them beside the
published MNIST rows of the paper's peers (other data, for orientation only); `plot`
draws the figures; `sweep_summary`, `sweep_markdown` and `plot_sweep` do the same over λ.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sclref import data, models, nn, provenance, storage
from sclref.autograd import Tensor, no_grad
from sclref.errors import InputError
from sclref.runs import load_model
from sclref.train import TrainConfig, build_model, load_data

FORMAT = "sclref-reproduce"
RESULTS = "results.json"
# λ of every SCL variant unless given: the `sclref train` default on digits; on 28x28 data
# 0.003 gave 97.3 % sparsity at dense-level error on Fashion-MNIST (20 + 5 epochs).
DEFAULT_LAM = {"digits": 0.03}
FALLBACK_LAM = 0.003


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "dense", "scl" or "magnitude"
    overrides: tuple = ()  # TrainConfig fields that differ from the shared settings
    scope: str = "layer"  # magnitude only: per-layer counts or one global threshold
    global_scale: bool = False  # λ · c and mask_lr / c, c = Settings.no_norm_scale


METHODS = {
    "dense": Method("dense", "dense", (("masked", False),)),
    "scl_identity": Method("SCL, identity STE (the paper's)", "scl", (("ste", "identity"),)),
    "scl_leaky_relu": Method("SCL, Leaky ReLU STE (α 0.1)", "scl", (("ste", "leaky_relu"),)),
    "scl_softplus": Method("SCL, Softplus STE", "scl", (("ste", "softplus"),)),
    "magnitude": Method("magnitude prune + retrain, SCL-identity's per-layer sparsity", "magnitude"),
    "scl_identity_flops": Method("SCL, identity STE, FLOPs-weighted regularizer", "scl",
                                 (("ste", "identity"), ("weighting", "flops"))),
    "scl_identity_no_norm": Method("ablation: SCL identity, no normalization", "scl",
                                   (("ste", "identity"), ("normalization", "none"))),
    "scl_identity_global_scale": Method("ablation: SCL identity, one global scale c instead of normalization",
                                        "scl", (("ste", "identity"), ("normalization", "none")), global_scale=True),
    "magnitude_global": Method("magnitude prune + retrain, one global threshold", "magnitude", scope="global"),
}
DEFAULT_METHODS = ("dense", "scl_identity", "scl_leaky_relu", "scl_softplus", "magnitude", "scl_identity_no_norm")
# A run erring this much has collapsed (chance is 90 % on ten classes); plots leave it out.
COLLAPSED_ERROR = 0.5
MODEL_LABELS = {"linear": "linear", "lenet300": "LeNet-300-100", "lenet5": "LeNet-5", "resnet20": "ResNet-20",
                "resnet56": "ResNet-56", "vgg11": "VGG-11", "vgg16": "VGG-16"}

# ../shared/SCL.md: published rows of the paper's peers on MNIST, (sparsity %, test error %).
PUBLISHED_MNIST = {
    "lenet300": [("dense", "0", "1.64"), ("magnitude prune + retrain (Han 2015)", "91.7", "1.6"),
                 ("Dynamic Network Surgery (Guo 2016)", "98.2", "2.0"),
                 ("Sparse Variational Dropout (Molchanov 2017)", "98.5", "1.9"), ("SNIP (Lee 2019)", "98.0", "2.4")],
    "lenet5": [("dense", "0", "0.80"), ("magnitude prune + retrain (Han 2015)", "91.7", "0.8"),
               ("Dynamic Network Surgery (Guo 2016)", "99.1", "0.9"),
               ("Sparse Variational Dropout (Molchanov 2017)", "99.6", "0.8"), ("SNIP (Lee 2019)", "99.0", "1.1")],
}


@dataclass
class Settings:
    """What a reproduction runs; every run shares all of it but the method's own overrides."""

    models: tuple = ("lenet300", "lenet5")
    data: str = "fashion-mnist"
    seeds: tuple = (0, 1, 2)
    methods: tuple = DEFAULT_METHODS
    epochs: int = 20
    finetune_epochs: int = 5
    lam: float | None = None  # None: DEFAULT_LAM of the data, else FALLBACK_LAM
    train_limit: int | None = None
    test_limit: int | None = None
    dtype: str = "float32"
    # c of scl_identity_global_scale: the RMS of the raw over the L2-normalized task gradient of
    # the mask variables, measured in fc1 of LeNet-300-100 at initialization on Fashion-MNIST
    # (7.9e-4; 5.8e-4 to 1.1e-3 over the first three epochs).
    no_norm_scale: float = 1e-3

    @classmethod
    def quick(cls, **changes) -> "Settings":
        """The seconds-long version: LeNet-300-100 on a digits subset, 2 + 1 epochs, one seed."""
        return dataclasses.replace(cls(models=("lenet300",), data="digits", seeds=(0,), epochs=2, finetune_epochs=1,
                                       train_limit=300, test_limit=100), **changes)

    @property
    def data_spec(self) -> str:
        return data.ALIASES.get(self.data, self.data)

    @property
    def data_label(self) -> str:
        return self.data if self.data in data.ALIASES or self.data == "digits" else Path(self.data).name

    @property
    def lam_value(self) -> float:
        return self.lam if self.lam is not None else DEFAULT_LAM.get(self.data, FALLBACK_LAM)

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting, before anything runs."""
        for name, known in (("models", models.MODELS), ("methods", METHODS)):
            chosen = getattr(self, name)
            if not chosen:
                raise ValueError(f"{name}: choose at least one of {', '.join(known)}")
            unknown = [c for c in chosen if c not in known]
            if unknown:
                raise ValueError(f"unknown {name} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"{name}: each may be given once, got {list(chosen)}")
        if not (math.isfinite(self.no_norm_scale) and self.no_norm_scale > 0):
            raise ValueError(f"no_norm_scale must be a finite number > 0, got {self.no_norm_scale}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be integers >= 0, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each may be given once, got {list(self.seeds)}")
        magnitude = [m for m in self.methods if METHODS[m].kind == "magnitude"]
        if magnitude and "scl_identity" not in self.methods:
            raise ValueError(f"{', '.join(magnitude)} prune to the sparsity scl_identity reaches: "
                             f"add scl_identity to the methods")
        if magnitude and self.finetune_epochs < 1:
            raise ValueError("magnitude pruning retrains during the fine-tune epochs: finetune_epochs must be >= 1")
        if self.data != "digits" and not Path(self.data_spec).exists():
            raise ValueError(f"data {self.data!r}: no such directory or file ('digits', 'fashion-mnist', "
                             f"or a directory of MNIST-format IDX files)")
        for model in self.models:  # every other setting is checked by TrainConfig itself
            self.config(model, "dense", self.seeds[0]).validate()

    def config(self, model: str, method: str, seed: int) -> TrainConfig:
        """The `TrainConfig` of one run."""
        scale = self.no_norm_scale if METHODS[method].global_scale else 1.0
        return TrainConfig(model=model, data=self.data_spec, lam=self.lam_value * scale, lam_per="step",
                           epochs=self.epochs,
                           finetune_epochs=self.finetune_epochs, seed=seed, dtype=self.dtype,
                           train_limit=self.train_limit, test_limit=self.test_limit,
                           mask_lr=TrainConfig.mask_lr / scale, **dict(METHODS[method].overrides))


def _plain_layer_report(directory: Path) -> list[dict]:
    """`layer_report` rows for the network without masks of a run directory: every connection kept."""
    model, saved = load_model(directory)
    with no_grad():  # a conv's multiply-adds per sample depend on the input size, known after a forward pass
        model(Tensor(np.zeros((1, *saved["in_shape"]), saved["config"]["dtype"])))
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            uses, n = module.uses_per_sample(), module.weight.size
            rows.append({"layer": name, "weights": n, "kept": n, "sparsity": 0.0, "dense_flops": 2 * uses * n,
                         "effective_flops": 2 * uses * n})
    return rows


def _record(key: dict, summary, directory: Path) -> dict:
    """The results record of one finished run, from its directory's (validated) summary."""
    layers = summary.layers or _plain_layer_report(directory)
    return {
        **key, "config": summary.config, "test_error": summary.test_error,
        "train_error": summary.history[-1]["train_error"], "sparsity": summary.sparsity, "layers": layers,
        "dense_flops": sum(r["dense_flops"] for r in layers),
        "effective_flops": sum(r["effective_flops"] for r in layers),
        # Mask flips per epoch over all layers (0 where masks are frozen or absent).
        "flips": [sum(layer["flips"] for layer in rec["layers"].values()) for rec in summary.history],
        "history": [{**{k: rec[k] for k in ("epoch", "phase", "loss", "train_error", "test_error", "sparsity", "lam")},
                     "seconds": t} for rec, t in zip(summary.history, summary.epoch_seconds)],
        "train_seconds": sum(t for t in summary.epoch_seconds if t is not None),
    }


def _ordered(methods) -> list[str]:
    """The methods with scl_identity before the baselines that prune to its sparsity."""
    return sorted(methods, key=lambda m: (METHODS[m].kind == "magnitude", list(METHODS).index(m)))


def run_directory(out, model: str, method: str, seed: int, config: TrainConfig) -> Path:
    """Where one run trains: ``<out>/runs/<model>-<method>-seed<k>-<settings hash>``.

    The hash of the run's settings keeps a run with other settings (another λ, say) out of
    the directory of an earlier one, so a changed setting starts afresh and an unchanged
    one resumes or is skipped.
    """
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return Path(out) / "runs" / f"{model}-{method}-seed{seed}-{digest}"


def reproduce(settings: Settings, out, log=print, scheduler: str | None = "serial", sweep=()) -> dict:
    """Train every (model, seed, method) of `settings` under `out`; write and return the results.

    The run directories under ``<out>/runs`` (`run_directory`) are the store: each run
    checkpoints every epoch there, through `sclref.experiments.execute` on `scheduler`
    ("serial", "local", a Dask scheduler address, or None to let it choose). A finished
    run is not trained again and an interrupted one resumes from its last epoch; which
    scheduler trained a run changes no byte. Magnitude pruning waits for SCL-identity of
    the same model, seed and λ and prunes each layer to the sparsity it reached.

    With `sweep`, the masked methods run again at each of its λ (dense training does not
    depend on λ and runs once), all in one submission, so that a cluster keeps every
    worker busy across the λ.

    Returns ``{"format", "version", "machine", "runs"}``, also written to
    ``<out>/results.json``: one record per run, read from its directory, keyed by model,
    data, method, seed and λ (None for dense).
    """
    from sclref.experiments.executor import Run, execute

    lams = [float(lam) for lam in sweep]
    if any(not (math.isfinite(lam) and lam > 0) for lam in lams) or len(set(lams)) != len(lams):
        raise ValueError(f"sweep: give each λ > 0 once, got {lams}")
    settings.validate()
    masked = tuple(m for m in settings.methods if METHODS[m].kind != "dense")
    parts = [settings] + [dataclasses.replace(settings, lam=lam, methods=masked)
                          for lam in lams if lam != settings.lam_value]
    for part in parts[1:]:  # every part is checked before the first run starts
        part.validate()
    dataset = load_data(settings.config(settings.models[0], "dense", settings.seeds[0]))  # what every run trains on
    for model in settings.models:  # a model that cannot take this data fails now, not after hours
        try:
            build_model(settings.config(model, "dense", 0), dataset.in_shape, dataset.num_classes)
        except ValueError as err:
            raise ValueError(f"model {model} cannot take the data {settings.data_label!r}: {err}") from None
    planned, keys = [], {}
    for part in parts:
        suffix = f" λ {part.lam_value:g}" if len(parts) > 1 else ""
        for model in part.models:
            for seed in part.seeds:
                for method in _ordered(part.methods):
                    config, kind = part.config(model, method, seed), METHODS[method].kind
                    name = f"{MODEL_LABELS[model]} seed {seed} {method}{suffix}"
                    depends, prepare = (), None
                    if kind == "magnitude":
                        depends = (f"{MODEL_LABELS[model]} seed {seed} scl_identity{suffix}",)
                        prepare = functools.partial(_prepare_magnitude, scope=METHODS[method].scope, scl=depends[0])
                    keys[name] = {"model": model, "data": settings.data_label, "method": method, "seed": seed,
                                  "lam": None if kind == "dense" else part.lam_value}
                    planned.append(Run(name, config, run_directory(out, model, method, seed, config), depends,
                                       prepare))
    summaries = execute(planned, scheduler=scheduler, log=log)
    results = {"format": FORMAT, "version": 2, "machine": provenance.machine(),
               "runs": [_record(keys[run.name], summaries[run.name], run.directory) for run in planned]}
    storage.atomic_write_json(Path(out) / RESULTS, results)
    return results


def _prepare_magnitude(config: dict, done: dict, scope: str, scl: str) -> dict:
    """A magnitude run's settings once SCL-identity of its model and seed is known: prune to its sparsity."""
    target = done[scl].sparsity if scope == "global" else {r["layer"]: 1 - r["kept"] / r["weights"]
                                                                      for r in done[scl].layers}
    return {**config, "prune_scope": scope, "prune_sparsity": target}


def _stats(values) -> dict:
    """Mean and sample standard deviation (ddof 1; None for a single value) of `values`."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def summarize(results: dict, settings: Settings) -> list[dict]:
    """Mean ± std over seeds per (model, method), for the runs these settings asked for (at their λ)."""
    rows = []
    for model in settings.models:
        for method in settings.methods:
            lam = None if METHODS[method].kind == "dense" else settings.lam_value
            runs = [r for seed in settings.seeds for r in results["runs"]
                    if (r["model"], r["data"], r["method"], r["seed"], r["lam"])
                    == (model, settings.data_label, method, seed, lam)]
            if not runs:
                continue
            shapes = {(tuple(row["layer"] for row in r["layers"]), len(r["history"])) for r in runs}
            if len(shapes) > 1:
                raise InputError(f"the runs of {model} / {method} disagree on their layers or epochs: "
                                 "they were made with other settings; rerun them")
            mask_epochs = [i for i, rec in enumerate(runs[0]["history"]) if rec["phase"] == "mask"]
            rows.append({
                "model": model, "method": method, "label": METHODS[method].label,
                "seeds": [r["seed"] for r in runs],
                "test_error": _stats(r["test_error"] for r in runs),
                "sparsity": _stats(r["sparsity"] for r in runs),
                "layers": {row["layer"]: _stats(r["layers"][i]["sparsity"] for r in runs)
                           for i, row in enumerate(runs[0]["layers"])},
                "dense_flops": runs[0]["dense_flops"],
                "effective_flops": _stats(r["effective_flops"] for r in runs),
                "flips_per_epoch": [statistics.fmean(r["flips"][i] for r in runs) for i in mask_epochs],
                "train_seconds": _stats(r["train_seconds"] for r in runs),
            })
    return rows


def _per_model(rows: list[dict], settings: Settings):
    """(model, its rows) for each model of `settings` that has rows, in the settings' order."""
    for model in settings.models:
        mine = [r for r in rows if r["model"] == model]
        if mine:
            yield model, mine


def _pm(stat: dict, scale: float = 100, digits: int = 2) -> str:
    mean = f"{scale * stat['mean']:.{digits}f}"
    return mean if stat["std"] is None else f"{mean} ± {scale * stat['std']:.{digits}f}"


def _kept(row: dict) -> float:
    """The fraction of the dense multiply-adds a summary row's network keeps (mean over seeds)."""
    return row["effective_flops"]["mean"] / row["dense_flops"]


def _flips(flips: list) -> str:
    return f"{flips[0]:,.0f} → {flips[-1]:,.0f}" if flips else "—"


def _table(header: list, rows) -> list[str]:
    """The lines of a Markdown table: the header, its rule, and one line per row of cells."""
    return [f"| {' | '.join(header)} |", "|---" * len(header) + "|",
            *(f"| {' | '.join(map(str, row))} |" for row in rows)]


def _reduction(kept: float) -> str:
    """How many times fewer multiply-adds, for a kept fraction; a handful of surviving weights is not a speed-up."""
    if kept < 5e-5:  # shown as 0.00 %: nothing worth a ratio is left
        return "nothing left" if kept == 0 else "almost nothing left"
    return f"{1 / kept:.1f}×"


def markdown(summary: list[dict], settings: Settings) -> str:
    """Per model: the measured table, the per-layer table, and the published MNIST rows beside them."""
    out = []
    for model, rows in _per_model(summary, settings):
        seeds = ", ".join(map(str, settings.seeds))
        out.append(f"### {MODEL_LABELS[model]} on {settings.data_label}: measured\n\n"
                   f"Seeds {seeds}; {settings.epochs} mask-learning + {settings.finetune_epochs} fine-tune epochs "
                   f"for every method (dense: {settings.epochs + settings.finetune_epochs} epochs; magnitude: "
                   f"{settings.epochs} dense + {settings.finetune_epochs} retraining); λ = {settings.lam_value:g} for "
                   f"every SCL variant"
                   + (f" (the global-scale ablation: λ·c = {settings.lam_value * settings.no_norm_scale:g}, mask lr "
                      f"{TrainConfig.mask_lr / settings.no_norm_scale:g}, c = {settings.no_norm_scale:g})"
                      if any(METHODS[r["method"]].global_scale for r in rows) else "")
                   + "; final-epoch test error, mean ± std (ddof 1) over seeds.\n")
        out += _table(["method", "seeds", "test error %", "sparsity %", "FLOPs kept % (reduction)",
                       "mask flips, first → last mask epoch", "s per run (epochs)"],
                      [[r["label"], len(r["seeds"]), _pm(r["test_error"]), _pm(r["sparsity"]),
                        f"{100 * _kept(r):.2f} ({_reduction(_kept(r))})", _flips(r["flips_per_epoch"]),
                        f"{r['train_seconds']['mean']:.1f}"] for r in rows])
        layer_names = list(rows[0]["layers"])
        out.append(f"\nPer-layer sparsity % (mean ± std); dense multiply-adds per sample: "
                   f"{rows[0]['dense_flops'] // 2:,}\n")
        out += _table(["method", *layer_names],
                      [[r["label"], *(_pm(r["layers"][n], digits=1) for n in layer_names)] for r in rows])
        if model in PUBLISHED_MNIST:
            out.append(f"\n{MODEL_LABELS[model]}, published, MNIST — other data (the peers' own MNIST numbers, as "
                       f"the SCL paper compares against them; for orientation only, not comparable with the rows "
                       f"above)\n")
            out += _table(["method (published, MNIST — other data)", "sparsity %", "test error %"],
                          PUBLISHED_MNIST[model])
        out.append("")
    return "\n".join(out)


def plot(summary: list[dict], settings: Settings, out_dir) -> list[Path]:
    """Per model: error vs connections kept, per-layer sparsity bars, mask flips per epoch; returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for model, rows in _per_model(summary, settings):
        stem = f"{model}-{settings.data_label}"
        title = f"{MODEL_LABELS[model]} on {settings.data_label}, {len(settings.seeds)} seed(s)"

        # Left: every method on a log axis; right: the sparse ones up close, dense as a line.
        # A run that pruned everything has no place on a log axis, and one that collapsed to
        # near-chance error would squash every other point into one line: both are left out
        # and counted in the legend (the tables hold them).
        fig, (wide, close) = plt.subplots(1, 2, figsize=(11, 4.5))
        for r in rows:
            points = [(100 * (1 - s), 100 * e) for s, e in zip(r["sparsity"]["values"], r["test_error"]["values"])]
            drawn = [(k, e) for k, e in points if k > 0 and e < 100 * COLLAPSED_ERROR]
            label = r["label"] + ("" if len(drawn) == len(points) else
                                  f" ({len(points) - len(drawn)} run(s) kept nothing or err ≥ "
                                  f"{100 * COLLAPSED_ERROR:g} %: not drawn)")
            axes = (wide,) if r["method"] == "dense" else (wide, close)
            if not drawn:
                wide.plot([], [], "o", color=colors[r["method"]], label=label)
                continue
            for ax in axes:
                ax.scatter(*zip(*drawn), s=14, alpha=0.5, color=colors[r["method"]])
                errs = [e for _, e in drawn]
                ax.errorbar(statistics.fmean(k for k, _ in drawn), statistics.fmean(errs),
                            yerr=statistics.stdev(errs) if len(errs) > 1 else None, fmt="o", ms=8, capsize=3,
                            color=colors[r["method"]], label=label if ax is wide else None)
            if r["method"] == "dense":
                close.axhline(100 * r["test_error"]["mean"], color=colors["dense"], ls="--", lw=1,
                              label="dense (mean)")
        _log_axis(wide.xaxis, wide.set_xscale)
        wide.set_xlabel("connections kept % (log; 100 = dense)")
        wide.set_ylabel("final-epoch test error %")
        close.set_xlabel("connections kept %")
        close.set_title("sparse methods up close", fontsize=9)
        for ax in (wide, close):
            ax.grid(alpha=0.3, which="both")
        # One legend under both panels, where it hides no point.
        handles, labels = [sum(pair, []) for pair in zip(wide.get_legend_handles_labels(),
                                                          close.get_legend_handles_labels())]
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
        fig.suptitle(f"Error vs sparsity (mean ± std and each seed): {title}", fontsize=10)
        fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) + 1) // 2), 1, 1))
        written.append(_save(fig, out_dir / f"{stem}-error_vs_sparsity.png"))

        sparse_rows = [r for r in rows if r["method"] != "dense"]
        if sparse_rows:
            names = list(sparse_rows[0]["layers"])
            many = len(names) > 6  # a deep network's layer names, upright, would run into each other
            fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(names)), 6.2 if many else 5.2))
            width = 0.8 / len(sparse_rows)
            # Kept share on a log axis: at 97 % and 99 % sparsity, bars of sparsity would look alike.
            for i, r in enumerate(sparse_rows):
                x = np.arange(len(names)) + (i - (len(sparse_rows) - 1) / 2) * width
                sparsities = [100 * r["layers"][n]["mean"] for n in names]
                bars = ax.bar(x, [max(100 - sp, 1e-2) for sp in sparsities], width, color=colors[r["method"]],
                              label=r["label"])
                ax.bar_label(bars, [f"{sp:.1f}" for sp in sparsities], fontsize=6, rotation=90, padding=2)
            ax.set_xticks(np.arange(len(names)), names, rotation=90 if many else 0, fontsize=7 if many else None)
            _log_axis(ax.yaxis, ax.set_yscale)
            ax.set_ylim(top=300)
            ax.set_ylabel("connections kept % (log) = 100 − sparsity")
            ax.set_title(f"Per-layer sparsity (label: sparsity %, mean over seeds): {title}", fontsize=9)
            fig.legend(loc="lower center", ncol=2, fontsize=7, frameon=False)  # under the bars, hiding none
            fig.tight_layout(rect=(0, 0.035 * ((len(sparse_rows) + 1) // 2) + 0.02, 1, 1))
            written.append(_save(fig, out_dir / f"{stem}-layer_sparsity.png"))

        scl_rows = [r for r in rows if METHODS[r["method"]].kind == "scl" and r["flips_per_epoch"]]
        if scl_rows:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for r in scl_rows:
                flips = r["flips_per_epoch"]
                ax.plot(np.arange(1, len(flips) + 1), np.maximum(flips, 0.5), marker=".", color=colors[r["method"]],
                        label=r["label"])
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("mask-learning epoch")
            ax.set_ylabel("mask flips per epoch (mean over seeds; 0 drawn at 0.5)")
            ax.set_title(f"Mask flips: {title}")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, which="both")
            written.append(_save(fig, out_dir / f"{stem}-mask_flips.png"))
    return written


def sweep_summary(results: dict, settings: Settings) -> list[dict]:
    """`summarize` at every λ of the results, each row with its ``lam``; dense once, with λ None."""
    rows = summarize(results, dataclasses.replace(settings, methods=("dense",)))
    masked = tuple(m for m in settings.methods if METHODS[m].kind != "dense")
    for lam in sorted({r["lam"] for r in results["runs"] if r["lam"] is not None}):
        rows += [{**row, "lam": lam} for row in summarize(results, dataclasses.replace(settings, lam=lam,
                                                                                       methods=masked))]
    return [{"lam": None, **row} for row in rows]


def sweep_markdown(rows: list[dict], settings: Settings) -> str:
    """Per model: test error and sparsity of each method at each λ."""
    out = []
    for model, mine in _per_model(rows, settings):
        out.append(f"### {MODEL_LABELS[model]} on {settings.data_label}: λ sweep\n")
        mine = sorted(mine, key=lambda r: (list(METHODS).index(r["method"]), r["lam"] or 0))
        out += _table(["method", "λ", "seeds", "test error %", "sparsity %", "FLOPs kept %"],
                      [[r["label"], "—" if r["lam"] is None else f"{r['lam']:g}", len(r["seeds"]), _pm(r["test_error"]),
                        _pm(r["sparsity"]), f"{100 * _kept(r):.2f}"] for r in mine])
        out.append("")
    return "\n".join(out)


def plot_sweep(rows: list[dict], settings: Settings, out_dir) -> list[Path]:
    """Per model: final-epoch test error against connections kept, one line per method over λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    written = []
    for model, mine in _per_model(rows, settings):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for method in METHODS:
            points = sorted((r for r in mine if r["method"] == method and r["sparsity"]["mean"] < 1),
                            key=lambda r: r["sparsity"]["mean"])
            if not points:
                continue
            if method == "dense":
                err = points[0]["test_error"]
                ax.axhline(100 * err["mean"], color=colors[method], ls="--", lw=1, label=f"{METHODS[method].label} "
                           f"(mean; band ± std)")
                if err["std"]:
                    ax.axhspan(100 * (err["mean"] - err["std"]), 100 * (err["mean"] + err["std"]),
                               color=colors[method], alpha=0.1)
                continue
            kept = [100 * (1 - r["sparsity"]["mean"]) for r in points]
            errs = [100 * r["test_error"]["mean"] for r in points]
            ax.errorbar(kept, errs, yerr=[100 * (r["test_error"]["std"] or 0) for r in points], marker="o", ms=5,
                        capsize=3, color=colors[method], label=METHODS[method].label)
            if METHODS[method].kind == "scl":
                for k, e, r in zip(kept, errs, points):
                    ax.annotate(f"λ {r['lam']:g}", (k, e), textcoords="offset points", xytext=(4, 4), fontsize=6,
                                color=colors[method])
        _log_axis(ax.xaxis, ax.set_xscale)
        ax.set_xlabel("connections kept % (log) = 100 − sparsity")
        ax.set_ylabel("final-epoch test error % (mean ± std over seeds)")
        ax.set_title(f"Error vs sparsity over λ: {MODEL_LABELS[model]} on {settings.data_label}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / f"{model}-{settings.data_label}-lam_sweep.png"))
    return written


def _log_axis(axis, set_scale) -> None:
    """A log axis with plain tick labels (2, 10, 100) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    set_scale("log")
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path) -> Path:
    import io as _io

    import matplotlib.pyplot as plt

    if not fig.get_layout_engine():  # a figure that set its own layout keeps it
        fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.atomic_write_bytes(path, buf.getvalue())
    return path
