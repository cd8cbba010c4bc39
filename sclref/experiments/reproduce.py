"""The results experiment: SCL against dense training and magnitude pruning, several seeds, one JSON.

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

Every run trains in its own directory beside the JSON file (``runs/<stem>/...``, named by
its settings' hash), checkpointing every epoch, through `sclref.experiments.execute`:
serially, on a local Dask cluster or on a cluster given by its scheduler's address. An
interrupted reproduction therefore continues every run from its last epoch. The JSON
file holds one record per run, keyed by model, data, method and seed with its full
settings; a run already there with the same settings is skipped. `summarize` turns
the runs into mean ± std over seeds of the *final-epoch* test error, sparsity overall and
per layer, FLOPs and mask flips; `markdown` prints them beside the published MNIST rows
of the paper's peers (other data, for orientation only); `plot` draws the figures.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sclref import data, models, nn, provenance, storage
from sclref.autograd import Tensor, no_grad
from sclref.errors import InputError
from sclref.runs import METRICS, load_model
from sclref.train import TrainConfig, build_model, load_data

FORMAT = "sclref-reproduce"
DATA_ALIASES = data.ALIASES
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
        return DATA_ALIASES.get(self.data, self.data)

    @property
    def data_label(self) -> str:
        return self.data if self.data in DATA_ALIASES or self.data == "digits" else Path(self.data).name

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

    def dataset(self):
        """The data every run of these settings trains on (limits and dtype applied)."""
        return load_data(self.config(self.models[0], "dense", self.seeds[0]))

    def config(self, model: str, method: str, seed: int) -> TrainConfig:
        """The `TrainConfig` of one run."""
        scale = self.no_norm_scale if METHODS[method].global_scale else 1.0
        return TrainConfig(model=model, data=self.data_spec, lam=self.lam_value * scale, lam_per="step",
                           epochs=self.epochs,
                           finetune_epochs=self.finetune_epochs, seed=seed, dtype=self.dtype,
                           train_limit=self.train_limit, test_limit=self.test_limit,
                           mask_lr=TrainConfig.mask_lr / scale, **dict(METHODS[method].overrides))


def machine() -> dict:
    """Where and with what the numbers were measured."""
    return provenance.machine()


def load_runs(path) -> dict:
    """The results file at `path`, or an empty one when there is none yet.

    Every run record is checked field by field (types, ranges, lengths that agree), so a
    damaged or hand-edited file is an `InputError` naming the run and the field, never a
    crash in the tables built from it.
    """
    path = Path(path)
    if not path.exists():
        return {"format": FORMAT, "version": 1, "machine": machine(), "runs": []}
    try:
        if path.stat().st_size > _MAX_RESULTS_BYTES:
            raise InputError(f"{path}: larger than {_MAX_RESULTS_BYTES:,} bytes, not a results file of sclref's")
        store = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"{path}: not a readable JSON file ({type(err).__name__}); move it away to start afresh") \
            from None
    if not isinstance(store, dict) or store.get("format") != FORMAT or not isinstance(store.get("runs"), list):
        raise InputError(f"{path}: not an sclref reproduce results file; choose another output")
    for i, run in enumerate(store["runs"]):
        problem = _run_problem(run)
        if problem:
            raise InputError(f"{path}: run {i}: {problem}; move the file away to start afresh")
    return store


_MAX_RESULTS_BYTES = 256 << 20
_FRACTION, _COUNT, _NUMBER, _TEXT = "fraction", "count", "number", "text"
_RUN_FIELDS = {"model": _TEXT, "data": _TEXT, "method": _TEXT, "seed": _COUNT, "test_error": _FRACTION,
               "train_error": _FRACTION, "sparsity": _FRACTION, "dense_flops": _COUNT, "effective_flops": _NUMBER,
               "train_seconds": _NUMBER}
_LAYER_FIELDS = {"layer": _TEXT, "weights": _COUNT, "kept": _COUNT, "sparsity": _FRACTION, "dense_flops": _COUNT,
                 "effective_flops": _NUMBER}
_EPOCH_FIELDS = {"epoch": _COUNT, "phase": _TEXT, "loss": _NUMBER, "train_error": _FRACTION,
                 "test_error": _FRACTION, "sparsity": _FRACTION}


def _field_problem(record, fields: dict) -> str | None:
    if not isinstance(record, dict):
        return f"a record must be an object, got {type(record).__name__}"
    for name, kind in fields.items():
        value = record.get(name)
        if kind == _TEXT:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (kind != _COUNT or (isinstance(value, int) and value >= 0)) \
                and (kind != _FRACTION or 0 <= value <= 1)
        if not ok:
            return f"{name} must be a {kind}, got {value!r}"[:200]
    return None


def _run_problem(run) -> str | None:
    """What is wrong with one run record of a results file, or None."""
    problem = _field_problem(run, _RUN_FIELDS)
    if problem:
        return problem
    if not isinstance(run.get("settings"), dict):
        return "settings must be an object"
    for key, fields in (("layers", _LAYER_FIELDS), ("history", _EPOCH_FIELDS)):
        records = run.get(key)
        if not isinstance(records, list) or not records:
            return f"{key} must be a non-empty list"
        for j, record in enumerate(records):
            problem = _field_problem(record, fields)
            if problem:
                return f"{key}[{j}]: {problem}"
    flips = run.get("flips")
    if not (isinstance(flips, list) and len(flips) == len(run["history"])
            and all(isinstance(f, int) and not isinstance(f, bool) for f in flips)):
        return "flips must be a list of integers, one per epoch of the history"
    return None


def _find(store: dict, key: dict) -> dict | None:
    for run in store["runs"]:
        if all(run.get(k) == v for k, v in key.items()):
            return run
    return None


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


def _record(key: dict, run_settings: dict, directory: Path, load: float) -> dict:
    """The results-file record of one finished run, read from its directory."""
    metrics = json.loads((directory / METRICS).read_text())
    history, seconds = metrics["history"], metrics["timing"]["epoch_seconds"]
    layers = metrics["final"]["layers"] or _plain_layer_report(directory)
    weights, kept = sum(r["weights"] for r in layers), sum(r["kept"] for r in layers)
    final = history[-1]
    train_seconds = sum(t for t in seconds if t is not None)
    return {
        **key, "settings": run_settings,
        "test_error": final["test_error"], "train_error": final["train_error"],
        "sparsity": 1 - kept / weights, "layers": layers,
        "dense_flops": sum(r["dense_flops"] for r in layers),
        "effective_flops": sum(r["effective_flops"] for r in layers),
        # Mask flips per epoch over all layers (0 where masks are frozen or absent).
        "flips": [sum(layer["flips"] for layer in rec["layers"].values()) for rec in history],
        "history": [{**{k: rec[k] for k in ("epoch", "phase", "loss", "train_error", "test_error", "sparsity", "lam")},
                     "seconds": t} for rec, t in zip(history, seconds)],
        "train_seconds": train_seconds, "load_average": load,
    }


def _ordered(methods) -> list[str]:
    """The methods with scl_identity before the baselines that prune to its sparsity."""
    return sorted(methods, key=lambda m: (METHODS[m].kind == "magnitude", list(METHODS).index(m)))


def run_directory(json_path, model: str, method: str, seed: int, config: TrainConfig) -> Path:
    """Where one run of a results file trains: ``runs/<results stem>/<model>-<method>-seed<k>-<settings hash>``.

    The hash of the run's settings keeps a run with other settings out of the directory of
    an earlier one, so a changed setting starts afresh and an unchanged one resumes.
    """
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    json_path = Path(json_path)
    return json_path.parent / "runs" / json_path.stem / f"{model}-{method}-seed{seed}-{digest}"


def reproduce(settings: Settings, json_path, log=print, dataset=None, scheduler: str | None = "serial") -> dict:
    """Run every (model, seed, method) not yet in `json_path` with these settings; return the file's content.

    Each run trains in its own directory (`run_directory`), checkpointing every epoch,
    through `sclref.experiments.execute` on `scheduler` ("serial", "local", a Dask
    scheduler address, or None to let it choose): an interrupted reproduction resumes
    every run from its last epoch, and which scheduler trained a run changes no byte.
    Magnitude pruning waits for SCL-identity of the same model and seed and prunes each
    layer to the sparsity it reached. `dataset` may be passed to check the models
    against it without loading it (it must be what ``settings.data`` names).
    """
    return _reproduce([(settings, Path(json_path))], log, dataset, scheduler)[0]


def _reproduce(parts: list, log, dataset, scheduler) -> list[dict]:
    """`reproduce` for several (settings, results file) pairs whose runs all go to one `execute`.

    One submission lets a cluster keep every worker busy across the parts (a λ sweep of
    three seeds per λ would leave a worker of two idle at the end of each λ).
    """
    from sclref.experiments.executor import Run, execute

    for settings, _ in parts:  # every part is checked before the first run starts
        settings.validate()
    stores = [load_runs(path) for _, path in parts]
    first = parts[0][0]
    dataset = first.dataset() if dataset is None else dataset
    for model in first.models:  # a model that cannot take this data fails now, not after hours
        try:
            build_model(first.config(model, "dense", 0), dataset.in_shape, dataset.num_classes)
        except ValueError as err:
            raise ValueError(f"model {model} cannot take the data {first.data_label!r}: {err}") from None
    planned, keys = [], {}
    for part, ((settings, json_path), store) in enumerate(zip(parts, stores)):
        suffix = f" λ {settings.lam_value:g}" if len(parts) > 1 else ""
        for model in settings.models:
            for seed in settings.seeds:
                for method in _ordered(settings.methods):
                    key = {"model": model, "data": settings.data_label, "method": method, "seed": seed}
                    config = settings.config(model, method, seed)
                    name = f"{MODEL_LABELS[model]} seed {seed} {method}{suffix}"
                    done = _find(store, key)
                    run_settings = {"config": config.to_dict()}
                    reference = _find(store, {**key, "method": "scl_identity"})
                    magnitude = METHODS[method].kind == "magnitude"
                    if magnitude:
                        run_settings.update(scope=METHODS[method].scope)
                        if reference is not None:
                            run_settings.update(kept={r["layer"]: r["kept"] for r in reference["layers"]})
                    if done is not None and done["settings"] == run_settings:
                        log(f"[{name}] already in {json_path.name}, skipped")
                        continue
                    depends, prepare = (), None
                    if magnitude:
                        scl_name = f"{MODEL_LABELS[model]} seed {seed} scl_identity{suffix}"
                        depends = (scl_name,) if scl_name in keys else ()
                        prepare = functools.partial(_prepare_magnitude, scope=METHODS[method].scope, scl=scl_name,
                                                    reference=None if depends else reference)
                    keys[name] = (part, key, run_settings, done)
                    planned.append(Run(name, config, run_directory(json_path, model, method, seed, config), depends,
                                       prepare))
    if not planned:
        return stores
    summaries = execute(planned, scheduler=scheduler, log=log)
    load = os.getloadavg()[0]
    for run in planned:
        part, key, run_settings, done = keys[run.name]
        if METHODS[key["method"]].kind == "magnitude":
            run_settings["kept"] = {r["layer"]: r["kept"] for r in summaries[run.name].layers}
        record = _record(key, run_settings, run.directory, load)
        stores[part]["runs"] = [r for r in stores[part]["runs"] if r is not done] + [record]
        log(f"[{run.name}] test error {100 * record['test_error']:.2f}%, sparsity {100 * record['sparsity']:.2f}%, "
            f"{record['train_seconds']:.1f}s")
    for part in sorted({keys[run.name][0] for run in planned}):
        stores[part]["machine"] = machine()
        storage.atomic_write_json(parts[part][1], stores[part])
    return stores


def _prepare_magnitude(config: dict, done: dict, scope: str, scl: str, reference: dict | None) -> dict:
    """A magnitude run's settings once SCL-identity of its model and seed is known: prune to its sparsity."""
    if reference is not None:  # SCL-identity was already in the results file
        layers, overall = reference["layers"], reference["sparsity"]
    else:
        layers, overall = done[scl].layers, done[scl].sparsity
    target = overall if scope == "global" else {r["layer"]: 1 - r["kept"] / r["weights"] for r in layers}
    return {**config, "prune_scope": scope, "prune_sparsity": target}


def _stats(values) -> dict:
    """Mean and sample standard deviation (ddof 1; None for a single value) of `values`."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def summarize(store: dict, settings: Settings) -> list[dict]:
    """Mean ± std over seeds per (model, method), for the runs these settings asked for."""
    rows = []
    for model in settings.models:
        for method in settings.methods:
            runs = [_find(store, {"model": model, "data": settings.data_label, "method": method, "seed": s})
                    for s in settings.seeds]
            runs = [r for r in runs if r is not None]
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
        out.append("| method | seeds | test error % | sparsity % | FLOPs kept % (reduction) | mask flips, first → "
                   "last mask epoch | s per run (epochs) |")
        out.append("|---|---|---|---|---|---|---|")
        for r in rows:
            kept = r["effective_flops"]["mean"] / r["dense_flops"]
            flips = r["flips_per_epoch"]
            out.append(f"| {r['label']} | {len(r['seeds'])} | {_pm(r['test_error'])} | {_pm(r['sparsity'])} | "
                       f"{100 * kept:.2f} ({_reduction(kept)}) | "
                       f"{f'{flips[0]:,.0f} → {flips[-1]:,.0f}' if flips else '—'} | "
                       f"{r['train_seconds']['mean']:.1f} |")
        layer_names = list(rows[0]["layers"])
        out.append(f"\nPer-layer sparsity % (mean ± std); dense multiply-adds per sample: "
                   f"{rows[0]['dense_flops'] // 2:,}\n")
        out.append("| method | " + " | ".join(layer_names) + " |")
        out.append("|---|" + "---|" * len(layer_names))
        for r in rows:
            out.append(f"| {r['label']} | " + " | ".join(_pm(r["layers"][n], digits=1) for n in layer_names) + " |")
        if model in PUBLISHED_MNIST:
            out.append(f"\n{MODEL_LABELS[model]}, published, MNIST — other data (the peers' own MNIST numbers, as "
                       f"the SCL paper compares against them; for orientation only, not comparable with the rows "
                       f"above)\n")
            out.append("| method (published, MNIST — other data) | sparsity % | test error % |")
            out.append("|---|---|---|")
            out += [f"| {name} | {sp} | {err} |" for name, sp, err in PUBLISHED_MNIST[model]]
        out.append("")
    return "\n".join(out)


def plot(summary: list[dict], store: dict, settings: Settings, out_dir) -> list[Path]:
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
            fig, ax = plt.subplots(figsize=(7, 5.2))
            width = 0.8 / len(sparse_rows)
            # Kept share on a log axis: at 97 % and 99 % sparsity, bars of sparsity would look alike.
            for i, r in enumerate(sparse_rows):
                x = np.arange(len(names)) + (i - (len(sparse_rows) - 1) / 2) * width
                sparsities = [100 * r["layers"][n]["mean"] for n in names]
                bars = ax.bar(x, [max(100 - sp, 1e-2) for sp in sparsities], width, color=colors[r["method"]],
                              label=r["label"])
                ax.bar_label(bars, [f"{sp:.1f}" for sp in sparsities], fontsize=6, rotation=90, padding=2)
            ax.set_xticks(np.arange(len(names)), names)
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


def sweep_path(json_path, lam: float) -> Path:
    """Where the runs at another λ go: ``results.json`` → ``results-lam0.01.json`` beside it."""
    json_path = Path(json_path)
    return json_path.with_name(f"{json_path.stem}-lam{lam:g}{json_path.suffix}")


def sweep(settings: Settings, lams, json_path, log=print, dataset=None, scheduler: str | None = "serial") \
        -> dict[float, dict]:
    """`reproduce(settings, json_path)` and its masked methods again at each λ of `lams`, in one submission.

    The runs at another λ go to their own `sweep_path` file; dense training does not
    depend on λ and runs once, in `json_path`. Returns λ → results file content, the
    main file's λ (``settings.lam_value``) included, so that `sweep_summary` can draw
    error against sparsity over every λ measured.
    """
    lams = [float(lam) for lam in lams]
    if not lams or any(not (math.isfinite(lam) and lam > 0) for lam in lams):
        raise ValueError(f"sweep: give one or more λ > 0, got {lams}")
    if len(set(lams)) != len(lams):
        raise ValueError(f"sweep: each λ may be given once, got {lams}")
    methods = tuple(m for m in settings.methods if METHODS[m].kind != "dense")
    json_path = Path(json_path)
    others = [lam for lam in lams if lam != settings.lam_value]
    parts = [(settings, json_path)] + [(dataclasses.replace(settings, lam=lam, methods=methods),
                                        sweep_path(json_path, lam)) for lam in others]
    stores = _reproduce(parts, log, dataset, scheduler)
    return dict(sorted(zip([settings.lam_value, *others], stores)))


def sweep_summary(stores: dict[float, dict], settings: Settings) -> list[dict]:
    """`summarize` of every λ's runs, each row with its ``lam``; dense once (λ None) when any λ's file holds it."""
    rows = []
    methods = tuple(dict.fromkeys(("dense",) + tuple(settings.methods)))
    for lam, store in stores.items():
        for row in summarize(store, dataclasses.replace(settings, lam=lam, methods=methods)):
            if row["method"] == "dense":
                if not any(r["method"] == "dense" and r["model"] == row["model"] for r in rows):
                    rows.append({**row, "lam": None})
            else:
                rows.append({**row, "lam": lam})
    return rows


def sweep_markdown(rows: list[dict], settings: Settings) -> str:
    """Per model: test error and sparsity of each method at each λ."""
    out = []
    for model, mine in _per_model(rows, settings):
        out.append(f"### {MODEL_LABELS[model]} on {settings.data_label}: λ sweep\n")
        out.append("| method | λ | seeds | test error % | sparsity % | FLOPs kept % |")
        out.append("|---|---|---|---|---|---|")
        for r in sorted(mine, key=lambda r: (list(METHODS).index(r["method"]), r["lam"] or 0)):
            kept = r["effective_flops"]["mean"] / r["dense_flops"]
            lam = "—" if r["lam"] is None else f"{r['lam']:g}"
            out.append(f"| {r['label']} | {lam} | {len(r['seeds'])} | {_pm(r['test_error'])} | "
                       f"{_pm(r['sparsity'])} | {100 * kept:.2f} |")
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
