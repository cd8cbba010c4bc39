"""`sclref theory`: SCL's convergence principle for straight-through estimators, checked numerically.

The principle (SCL.md §4): an estimator's surrogate must be positive, ``g'(s) > 0``
everywhere, for mask variables to converge at their minima. `run` measures it for every
registered estimator on problems whose right answer is known:

- `surrogates`: is g' positive on a dense grid and on hypothesis-drawn points, where
  does it vanish;
- `dynamics`: one mask variable under a loss that prefers on or off (experiment 1), and
  many coupled mask variables with a planted, brute-force-verified best mask
  (experiment 2), run with the update rule ``s <- s - η (dL/dm) g'(s)``; and a
  diagnostic of experiment 2 with two-slope surrogates and decaying steps, which shows
  why leaky_relu's runs can keep flipping masks (docs/theory.md);
- `teacher`: a planted sparse teacher recovered by SCL on sclref's masked layers
  (experiment 3);

and `classify` turns the measurements into one verdict per estimator. `report` prints
the table and writes the JSON and plots; `cli` is the command.
"""

from __future__ import annotations

import time

import numpy as np

from sclref import ste as ste_registry
from sclref import threads
from sclref.theory import dynamics, surrogates, teacher

__all__ = ["CLASSES", "SETTINGS", "classify", "run"]

# The two sizes of the run: `quick` takes seconds, `full` well under two minutes on 2 cores.
SETTINGS = {
    "quick": {"hypothesis_examples": 100, "single_max_steps": 100_000, "planted_runs": 50, "planted_max_steps": 5_000,
              "teacher_seeds": 2, "teacher_epochs": 10, "diagnostic_runs": 50, "diagnostic_long_cap": 4},
    "full": {"hypothesis_examples": 1000, "single_max_steps": 100_000, "planted_runs": 1000,
             "planted_max_steps": 20_000, "teacher_seeds": 10, "teacher_epochs": 20, "diagnostic_runs": 1000,
             "diagnostic_long_cap": 10},
}

# Verdicts of `classify`, from the measurements alone.
CLASSES = {
    "converges": "every mask variable reached its optimum side and settled there",
    "chatters": "no mask froze on the wrong side, but some runs were still flipping masks around s = 0 at the step cap",
    "slow": "no mask froze on the wrong side, but some runs were still moving, without flipping, at the step cap",
    "dead masks": "some mask variables froze (g'(s) = 0) on the wrong side",
}


def classify(summary: dict) -> str:
    """The verdict (a key of `CLASSES`) for one estimator's `summary` from `run`.

    "dead masks" as soon as any experiment leaves a variable frozen on the wrong side;
    otherwise "converges" if every single-variable case crossed and every planted run
    settled at its optimum; otherwise "chatters" if some planted run was still flipping
    masks in the last steps before the cap, else "slow". A capped run is a measurement
    at the cap, not a proof that it never settles.
    """
    if summary["single_frozen"] or summary["planted_dead"] > 0 or summary["teacher_frozen"] > 0:
        return "dead masks"
    if summary["single_crossed"] == summary["single_wrong_starts"] and summary["planted_optimal"] == 1.0:
        return "converges"
    if summary["planted_flipping"] > 0:
        return "chatters"
    return "slow"


def _summary(check, single, planted, runs) -> dict:
    teacher_frozen = sum(r["dead"] + r["stuck_on"] for r in runs) / sum(r["connections"] for r in runs)
    # Precision is undefined for a run that kept nothing; it is left out of the mean.
    precision = np.array([np.nan if r["precision"] is None else r["precision"] for r in runs])
    recall = np.array([r["recall"] for r in runs])
    crossed_steps = single["steps"][single["wrong_start"] & single["right"]]
    out = {
        "declared": check.declared, "positive": check.positive, "zero_set": surrogates.describe_zero_set(
            check.zero_set, check.bound),
        "single_wrong_starts": int(single["wrong_start"].sum()),
        "single_crossed": int((single["wrong_start"] & single["right"]).sum()),
        "single_frozen": int(single["frozen"].sum()),
        "single_max_steps": int(crossed_steps.max()) if crossed_steps.size else None,
        "planted_optimal": planted["optimal_fraction"], "planted_dead": planted["dead_fraction"],
        "planted_unsettled": planted["unsettled_fraction"], "planted_flipping": planted["flipping_fraction"],
        "planted_chatter_on": planted["chatter_on"], "planted_chatter_grad": planted["chatter_grad"],
        "teacher_precision": None if np.isnan(precision).all() else float(np.nanmean(precision)),
        "teacher_precision_std": None if np.isnan(precision).all() else float(np.nanstd(precision)),
        "teacher_recall": float(recall.mean()), "teacher_recall_std": float(recall.std()),
        "teacher_kept": float(np.mean([r["kept"] / r["true"] for r in runs])),
        "teacher_on_time": float(np.mean([r["on_time"] for r in runs])),
        "teacher_frozen": float(teacher_frozen),
    }
    out["verdict"] = classify(out)
    out["agrees"] = (out["verdict"] != "dead masks") == check.declared and check.agrees
    return out


def run(quick: bool = False, seed: int = 0, stes=None, log=None) -> dict:
    """Run every check and experiment for each estimator; return all measurements.

    Parameters
    ----------
    quick : bool
        The seconds-long version (fewer runs, seeds and epochs), else the full one.
    seed : int
        Seeds every random draw; the same seed gives the same numbers.
    stes : list of str, optional
        Registered names to measure (default: every registered estimator); repeated
        names are measured once.
    log : callable, optional
        Called with one progress line per estimator and one for the diagnostic.

    Returns
    -------
    dict
        ``settings``, ``stes``, and per estimator name: ``surrogates`` (a
        `SurrogateCheck`), ``single`` and ``planted`` (from `dynamics`), ``teacher`` (one
        result per planted teacher) and ``summary`` (with its ``verdict``); ``diagnostic`` (rows of
        `dynamics.chatter_diagnostic`); ``seconds``.
    """
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be True or False, got {quick!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(stes, str):
        raise TypeError(f"stes must be a list of names, not the string {stes!r}")
    names = ste_registry.available() if stes is None else list(dict.fromkeys(stes))
    if not names:
        raise ValueError("no estimator to measure: stes is empty")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"stes must hold registered names, got {name!r}")
        ste_registry.get(name)  # an unknown name fails here, before any work
    mode = "quick" if quick else "full"
    cfg = SETTINGS[mode]
    teacher_config = teacher.TeacherConfig(epochs=cfg["teacher_epochs"])
    t0 = time.perf_counter()
    out = {"mode": mode, "seed": int(seed), "settings": {**cfg, "teacher": teacher_config.to_dict()},
           "stes": names, "surrogates": {}, "single": {}, "planted": {}, "teacher": {}, "summary": {}}
    with threads.pinned():  # the same bits whatever the machine's BLAS threads
        _measure(out, names, cfg, seed, teacher_config, log)
    out["seconds"] = time.perf_counter() - t0
    return out


def _measure(out: dict, names, cfg: dict, seed: int, teacher_config, log) -> None:
    for name in names:
        t = time.perf_counter()
        check = surrogates.check(name, max_examples=cfg["hypothesis_examples"])
        single = dynamics.single_variable(name, max_steps=cfg["single_max_steps"])
        planted = dynamics.planted_mask(name, runs=cfg["planted_runs"], seed=seed,
                                        max_steps=cfg["planted_max_steps"])
        runs = [teacher.planted_teacher(name, seed=seed, replicate=k, config=teacher_config)
                for k in range(cfg["teacher_seeds"])]
        out["surrogates"][name], out["single"][name], out["planted"][name] = check, single, planted
        out["teacher"][name] = runs
        out["summary"][name] = _summary(check, single, planted, runs)
        if log is not None:
            log(f"{name}: {out['summary'][name]['verdict']} ({time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    out["diagnostic"] = dynamics.chatter_diagnostic(cfg["diagnostic_runs"], seed=seed,
                                                    max_steps=cfg["planted_max_steps"],
                                                    long_cap=cfg["diagnostic_long_cap"])
    if log is not None:
        log(f"chatter diagnostic ({time.perf_counter() - t:.1f}s)")
