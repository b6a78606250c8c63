"""Engine benchmark: how well does label-free selection work on real images?

For every task, the product's own study runs (``--strategy``: staged, the default, or tpe,
the study before issue 11), guided by the default objective. Every trial records the value
of every registered objective on the same embeddings, so each objective's *selection* is
the argmin of its loss over the same set of selectable trials (full-length ones: a staged
screen's short trials are never chosen). Only here are labels read, to compute AUROC.

Tasks come in sets (bench/tasks.py): ``dev``, on which every design decision was taken;
``confirmation``, fixed in advance for the first staged design and never used for a decision
about it (its failures then shaped the second design, so it is development for that one);
``confirmation2``, fixed in advance for the second design; ``confirmation3``, fixed in
advance for the selection rule (the rank sum of DSV and MMD), chosen on the development
runs of the rounds before; ``confirmation4``, fixed in advance for the trust verdict
(``selection.trust``, its threshold read off the development runs); ``confirmation5``,
fixed in advance for the return to DSV alone as the selection rule (the three held-out sets
before it took part in that decision); ``confirmation6``, fixed in advance for how the
product uses the local families' ``placement: object``, and spent on the ninth round's
default (patches on the object with the white fills searched); ``confirmation7``, fixed in
advance for the tenth round (the finalists trained twice, ``bench.replicates``), which tied
with the default on the development runs (a tie keeps the default): it reads the ninth
round's default a second time; ``confirmation8``, fixed in advance for the eleventh round
(the ``tail-energy`` objective, ``--objective``); ``confirmation9``, fixed in advance for
the twelfth round (``tail-energy`` judged by the AUROC of its choice), which kept DSV, as
did the thirteenth (tail-energy as a guard), so it read the default; ``confirmation10``,
fixed in advance for the fourteenth round (the rank sum of DSV and MMD back as the
selection, decided on every run recorded before it); ``confirmation11``, fixed in advance
for the fifteenth round (the ``multilevel`` scorer, decided with ``bench.scorers`` on
development runs and spent held-out ones; every trial also records the Mahalanobis
scorer's AUROC of the same detector, ``auroc_by_scorer``); ``confirmation12``, fixed in
advance for the seventeenth round (the consensus of the top 3 as the choice, ``--output
consensus`` of bench.compare), which was not kept on the development runs, so it reads
the default.

    .venv/bin/python -m bench.engine --out bench/results/engine.json [--set dev] \
        [--tasks a,b] [--steps N] [--n-trials N] [--strategy staged|tpe] [--objective O]

Writes the JSON after each task (a crash keeps what finished) and prints a Markdown report.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from scipy.stats import spearmanr
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from bench.selection_rules import (
    LEGACY_SCORER,
    RULE,
    TAIL_GUARD,
    consensus,
    product_ranking,
    study_objective,
    tail_guard_order,
    trust_summary,
)
from bench.tasks import (
    Task,
    all_tasks,
    confirmation2_tasks,
    confirmation3_tasks,
    confirmation4_tasks,
    confirmation5_tasks,
    confirmation6_tasks,
    confirmation7_tasks,
    confirmation8_tasks,
    confirmation9_tasks,
    confirmation10_tasks,
    confirmation11_tasks,
    confirmation12_tasks,
    confirmation_tasks,
    development_tasks,
    within,
)
from ssad_common.jobspec import DEFAULT_OBJECTIVE, DEFAULT_SCORER
from ssad_common.search_space import CUTPASTE_DEFAULT, SCORER_NAMES, SearchSpace, get_family
from ssad_common.strategy import trust
from worker.core.data import prepare
from worker.core.objectives import OBJECTIVES
from worker.core.selection import TOP_K, Candidate, decisiveness, ensemble_scores
from worker.core.study import StudySettings, run_study
from worker.core.training import TrainSettings
from worker.core.trial import run_trial

TASK_SETS = {"dev": development_tasks, "confirmation": confirmation_tasks,
             "confirmation2": confirmation2_tasks,
             "confirmation3": confirmation3_tasks, "confirmation4": confirmation4_tasks,
             "confirmation5": confirmation5_tasks, "confirmation6": confirmation6_tasks,
             "confirmation7": confirmation7_tasks, "confirmation8": confirmation8_tasks,
             "confirmation9": confirmation9_tasks, "confirmation10": confirmation10_tasks,
             "confirmation11": confirmation11_tasks, "confirmation12": confirmation12_tasks,
             "all": all_tasks}


def knn_scores(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """Each test row's mean Euclidean distance to its ``k`` nearest train rows."""
    nn = NearestNeighbors(n_neighbors=min(k, len(train))).fit(train)
    dist, _ = nn.kneighbors(test)
    return np.asarray(dist.mean(axis=1))


def pixel_baselines(task: Task, seed: int = 0) -> dict[str, float]:
    """IsolationForest and kNN (mean distance to 5 nearest train images) on raw pixels."""
    def flat(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).float() / 255
        if t.shape[-1] > 32:
            t = torch.nn.functional.interpolate(t, size=(32, 32), mode="bilinear",
                                                antialias=True)
        return t.flatten(1).numpy()

    tr, te = flat(task.train), flat(task.test)
    iso = IsolationForest(n_estimators=200, random_state=seed).fit(tr)
    return {"iforest": float(roc_auc_score(task.labels, -iso.score_samples(te))),
            "knn": float(roc_auc_score(task.labels, knn_scores(tr, te, 5)))}


def _zscore(s: np.ndarray) -> np.ndarray:
    return (s - s.mean()) / (s.std() + 1e-12)


def placed(space: SearchSpace, placement: str | None) -> SearchSpace:
    """``space`` with every family that has a ``placement`` fixed at ``placement`` (as a
    user would, with ``search_space.fixed``); None: the product's default."""
    if placement is None:
        return space
    fixed = dict(space.fixed)
    for f in space.augmentations:
        if "placement" in get_family(f).defaults:
            fixed[f] = {**fixed.get(f, {}), "placement": placement}
    return replace(space, fixed=fixed)


def run_task(task: Task, steps: int, n_trials: int, seed: int, strategy: str,
             legacy_budget: bool, placement: str | None = None,
             objective: str = DEFAULT_OBJECTIVE, scorer: str = DEFAULT_SCORER,
             also_score: tuple[str, ...] = ()) -> dict[str, Any]:
    device = torch.device("cpu")
    train = TrainSettings(steps=steps, scorer=scorer, also_score=also_score)
    data = prepare(task.train, task.test, device)
    space = placed(SearchSpace.from_dict(task.search_space), placement)
    n = n_trials
    if legacy_budget and task.search_space is not None:  # the first runs' injected budget
        n = max(n_trials - 2, len(space.augmentations))
    settings = StudySettings(n_trials=n, seed=seed, search_space=space,
                             train=train, strategy=strategy,
                             objective=objective)
    t0 = time.perf_counter()
    result = run_study(data, settings)
    wall = time.perf_counter() - t0
    trials: list[dict[str, Any]] = []
    for t in result.trials:
        if t.result is None:
            continue
        r = t.result
        trials.append({
            "number": t.number, "augmentation": r.augmentation, "params": r.params,
            "stage": t.stage, "train_steps": r.train_steps,
            "losses": r.losses, "auroc": float(roc_auc_score(task.labels, r.scores)),
            # the same detector scored by the other scorers asked for (--also-score)
            "auroc_by_scorer": {name: float(roc_auc_score(task.labels, s))
                                for name, s in r.extra_scores.items()},
            "timings": r.timings,
        })
    eligible_numbers = {t.number for _, t in result.eligible}
    selectable = [t for t in trials if t["number"] in eligible_numbers]
    aurocs = np.array([t["auroc"] for t in selectable])
    scores = {t.number: t.result.scores for t in result.trials if t.result is not None}
    extra_scores = {t.number: t.result.extra_scores for t in result.trials
                    if t.result is not None}
    default_name, default_params = CUTPASTE_DEFAULT
    fixed = run_trial(data, default_name, default_params, replace(train, also_score=()),
                      seed=seed)
    per_objective = {}
    for name, ranked_ in selections(trials).items():
        cands = [Candidate(t["number"], t["augmentation"], value, scores[t["number"]])
                 for value, t in ranked_]
        decided = decisiveness(cands, settings.contamination)
        if name == TAIL_GUARD and decided["family_gap"] is not None:
            decided["family_gap_unit"] = "positions"  # ranked by place, not by one loss
        per_objective[name] = {
            **selection_entry(ranked_),
            "ensemble_top": float(roc_auc_score(task.labels, ensemble_scores(cands, TOP_K))),
            # the seventeenth round's candidate: the medoid of the top k (k = 3 fixed
            # before its runs; 5 for information), its trial number
            "consensus": {str(k): cands[consensus([c.scores for c in cands], k)].number
                          for k in (TOP_K, 5)},
            "decisiveness": decided,
        }
        if name == RULE and also_score:
            # the product's verdict and top-3 ensemble as the other scorers' scores read
            # them (the verdict's threshold was set on Mahalanobis's)
            by_scorer = per_objective[name]["by_scorer"] = {}
            for other in also_score:
                alt = [replace(c, scores=extra_scores[c.number][other]) for c in cands]
                by_scorer[other] = {
                    "decisiveness": decisiveness(alt, settings.contamination),
                    "ensemble_top": float(roc_auc_score(task.labels,
                                                        ensemble_scores(alt, TOP_K)))}
    all_z = ensemble_scores([Candidate(t["number"], t["augmentation"], 0.0,
                                       scores[t["number"]]) for t in selectable],
                            k=len(selectable))
    for kept in selectable:  # so that rules over the test scores can be replayed offline
        kept["test_scores"] = [float(f"{v:.6g}") for v in scores[kept["number"]].tolist()]
    screen = [t["auroc"] for t in trials if t["stage"] == "screen"]
    out = {
        "task": task.name, "kind": task.kind, "n_train": len(task.train),
        "n_test": len(task.test), "anomaly_fraction": float(task.labels.mean()),
        "image_shape": list(task.train.shape[1:]), "truth": task.truth,
        "search_space": space.to_dict(), "strategy": strategy, "plan": result.plan.to_json(),
        "leaders": result.leaders, "n_trials": len(trials), "n_selectable": len(selectable),
        "study_wall_s": wall,
        "trial_equivalents": result.plan.total_steps / steps,
        "oracle": float(aurocs.max()), "mean": float(aurocs.mean()),
        "screen_mean": float(np.mean(screen)) if screen else None,
        "fixed_cutpaste": float(roc_auc_score(task.labels, fixed.scores)),
        "ensemble": float(roc_auc_score(task.labels, all_z)),
        "pixel": pixel_baselines(task, seed),
        "median_trial_s": statistics.median(t["timings"]["total_s"] for t in selectable),
        "objectives": per_objective, "trials": trials,
    }
    return out


def selections(trials: list[dict[str, Any]]) -> dict[str, list[tuple[float, dict[str, Any]]]]:
    """Per way of choosing, the selectable trials best first with the value they are
    ranked by: the product's rule (:data:`RULE`, ssad_common.strategy.ranked: the rank
    sum of the default objective's loss and MMD's), each objective's loss alone, and the
    thirteenth round's candidate (:data:`TAIL_GUARD`: DSV with tail-energy's veto)."""
    chosen = product_ranking(trials)
    out: dict[str, list[tuple[float, dict[str, Any]]]] = {RULE: chosen}
    for name in (n for n in OBJECTIVES if n != RULE):
        out[name] = sorted(((t["losses"][name], t) for _, t in chosen),
                           key=lambda p: (p[0], p[1]["number"]))
    full = [t for _, t in chosen]
    # ranked by position (0, 1, ...): the guard's order is not one loss's, so its
    # "Spearman of -loss" is of -position and its family gap is in positions
    out[TAIL_GUARD] = [(float(p), full[i]) for p, i in enumerate(tail_guard_order(full))]
    return out


def selection_entry(ranked_: list[tuple[float, dict[str, Any]]]) -> dict[str, Any]:
    """What one way of choosing picked, its regret to the oracle and the Spearman
    correlation of −value with AUROC, over the same selectable trials."""
    best = ranked_[0][1]
    values = np.array([v for v, _ in ranked_])
    aurocs = np.array([t["auroc"] for _, t in ranked_])
    rho = spearmanr(-values, aurocs).statistic if len(ranked_) > 2 else float("nan")
    return {"selected": {"augmentation": best["augmentation"], "params": best["params"],
                         "auroc": best["auroc"], "number": best["number"]},
            "regret": float(aurocs.max() - best["auroc"]), "spearman": float(rho)}


def chooser(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """Whose choice a result file's trust table reads: the product's rule where the study
    was the default objective's and every run recorded the rule, else the objective that
    drove the study."""
    drove = study_objective(meta)
    if drove == DEFAULT_OBJECTIVE and all(RULE in r["objectives"] for r in results):
        return RULE
    return drove


def report(results: list[dict[str, Any]], chooser: str = RULE) -> str:
    """The Markdown report; its trust table reads ``chooser``'s choice (:func:`chooser`)."""
    lines = []
    names = [RULE, *(n for n in OBJECTIVES if n != RULE)]
    # Ways of choosing that every run recorded besides these (the tail guard in the runs
    # of 2026-12-03; the rank sum, RULE, where the file is of 2026-12-02 to 03).
    names += [n for n in results[0]["objectives"]
              if n not in names and all(n in r["objectives"] for r in results)]
    lines.append("| task | oracle | mean | fixed cutpaste | ensemble (all) | iforest | knn | "
                 + " | ".join(names) + " | s/trial | trial-equivalents |")
    lines.append("|" + "---|" * (9 + len(names)))
    for r in results:
        cells = [r["task"], f"{r['oracle']:.3f}", f"{r['mean']:.3f}",
                 "-" if r["fixed_cutpaste"] is None else f"{r['fixed_cutpaste']:.3f}",
                 f"{r['ensemble']:.3f}", f"{r['pixel']['iforest']:.3f}",
                 f"{r['pixel']['knn']:.3f}"]
        for n in names:
            o = r["objectives"][n]
            cells.append(f"{o['selected']['auroc']:.3f} ({o['spearman']:+.2f})")
        cells.append(f"{r['median_trial_s']:.1f}")
        cells.append(f"{r.get('trial_equivalents', r['n_trials']):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells per objective: AUROC of its selection (Spearman of −loss vs AUROC "
                 "across the task's selectable trials).")
    lines.append("")
    lines.append("| objective | median regret | beats mean | above both pixel baselines | "
                 "median Spearman | top-3 ensemble beats the selection |")
    lines.append("|---|---|---|---|---|---|")
    for n in names:
        regrets = [r["objectives"][n]["regret"] for r in results]
        sel = [r["objectives"][n]["selected"]["auroc"] for r in results]
        beats = sum(s_ > r["mean"] for s_, r in zip(sel, results, strict=True))
        pix = sum(s_ > max(r["pixel"]["iforest"], r["pixel"]["knn"])
                  for s_, r in zip(sel, results, strict=True))
        rho = statistics.median(r["objectives"][n]["spearman"] for r in results)
        ens = [r["objectives"][n].get("ensemble_top") for r in results]
        ens_s = ("-" if None in ens else
                 f"{sum(e > s_ for e, s_ in zip(ens, sel, strict=True))}/{len(results)} "
                 f"(median {statistics.median(ens):.3f} vs {statistics.median(sel):.3f})")
        lines.append(f"| {n} | {statistics.median(regrets):.3f} | {beats}/{len(results)} | "
                     f"{pix}/{len(results)} | {rho:+.2f} | {ens_s} |")
    inj = [r for r in results if r["kind"] == "injected"]
    if inj:
        lines.append("")
        lines.append("| injected task | true family / patch | objective | selected family / "
                     "patch | family ok | patch within 1.5× | AUROC |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in inj:
            t = r["truth"]
            for n in names:
                s_ = r["objectives"][n]["selected"]
                ps = s_["params"].get("patch_size")
                fam_ok = s_["augmentation"] == t["augmentation"]
                ps_ok = fam_ok and ps is not None and within(float(ps), t["patch_size"], 1.5)
                lines.append(
                    f"| {r['task']} | {t['augmentation']} {t['patch_size']:.3f} | {n} | "
                    f"{s_['augmentation']} {'-' if ps is None else f'{float(ps):.3f}'} | "
                    f"{'yes' if fam_ok else 'no'} | {'yes' if ps_ok else 'no'} | "
                    f"{s_['auroc']:.3f} |")
    dec = [r for r in results if "decisiveness" in r["objectives"][chooser]]
    if dec:
        lines.append("")
        lines.append(f"| task ({chooser}) | family gap (share) | top-3 agreement (Jaccard / "
                     "Spearman) | trust | selection − fixed cutpaste | regret | top-3 ensemble "
                     "− selection |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in dec:
            o = r["objectives"][chooser]
            d = o["decisiveness"]
            gap = ("-" if d["family_gap"] is None else
                   f"{d['family_gap']:.3f} ({d['family_gap_share'] or 0:.2f})")
            agree = ("-" if d["agreement_jaccard"] is None else
                     f"{d['agreement_jaccard']:.2f} / {d['agreement_spearman']:+.2f}")
            lines.append(f"| {r['task']} | {gap} | {agree} | "
                         f"{trust(d['agreement_jaccard']) or '-'} | "
                         f"{o['selected']['auroc'] - r['fixed_cutpaste']:+.3f} | "
                         f"{o['regret']:.3f} | "
                         f"{o['ensemble_top'] - o['selected']['auroc']:+.3f} |")
        lines.append("")
        lines.append(trust_summary(dec, chooser))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/engine.json")
    ap.add_argument("--set", default="dev", choices=sorted(TASK_SETS),
                    help="dev: the tasks decisions are taken on; confirmation, "
                    "confirmation2 to confirmation12: held out (see the module's "
                    "docstring)")
    ap.add_argument("--tasks", default="", help="comma-separated task names of the set "
                    "(default: all of it)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", default="staged", choices=("staged", "tpe"))
    ap.add_argument("--legacy-budget", action="store_true",
                    help="injected tasks get n_trials - 2 trials, as in the first runs")
    ap.add_argument("--placement", default=None, choices=("anywhere", "object"),
                    help="fix every local family's placement (search_space.fixed; default: "
                    "the product's, object since 2026-12-02, anywhere before)")
    ap.add_argument("--objective", default=DEFAULT_OBJECTIVE, choices=sorted(OBJECTIVES),
                    help="the loss that drives the study and ranks its trials (read its "
                    "choice with bench.compare --objective; default: the product's)")
    ap.add_argument("--scorer", default=DEFAULT_SCORER, choices=SCORER_NAMES,
                    help="the scorer every trial's AUROC is of (default: the product's)")
    ap.add_argument("--also-score", default=None,
                    help="other scorers to record per trial on the same detector "
                    "(auroc_by_scorer), comma-separated; default: mahalanobis when the "
                    "scorer is another, else none")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    if args.report_only:
        saved = json.loads(out.read_text())
        print(report(saved["results"], chooser(saved["meta"], saved["results"])))
        return 0
    wanted = set(filter(None, args.tasks.split(",")))
    pool = TASK_SETS[args.set]()
    tasks = [t for t in pool if not wanted or t.name in wanted]
    unknown = wanted - {t.name for t in tasks}
    if unknown:
        ap.error(f"--tasks: {', '.join(sorted(unknown))} not in --set {args.set} (it has "
                 f"{', '.join(t.name for t in pool)})")
    also = (tuple(filter(None, args.also_score.split(","))) if args.also_score is not None
            else () if args.scorer == LEGACY_SCORER else (LEGACY_SCORER,))
    meta = {"command": "python -m bench.engine " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
            "steps": args.steps, "n_trials": args.n_trials, "seed": args.seed,
            "strategy": args.strategy, "set": args.set, "objective": args.objective,
            "scorer": args.scorer, "also_score": list(also),
            # what the local families ran with (the product's default when not given)
            "placement": args.placement or get_family("cutout").param("placement").default}
    results: list[dict[str, Any]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        t0 = time.perf_counter()
        results.append(run_task(task, args.steps, args.n_trials, args.seed, args.strategy,
                                args.legacy_budget, args.placement, args.objective,
                                args.scorer, also))
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"# {task.name}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(report(results, chooser(meta, results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
