"""Which label-free rule chooses the best trial? Offline, from recorded engine runs.

Every trial of ``bench.engine`` records every objective's loss, so any rule that ranks the
selectable (full-length) trials by those losses can be replayed without training: each
rule's pick, its regret to the oracle (the best AUROC among the same trials), and whether it
beats the mean configuration and both pixel baselines. Labels are read only here, to score
the picks.

The rank sum of the default objective and MMD was chosen with this script on the
development runs (2026-12-01), the eleven rules below being all that were compared then:

    .venv/bin/python -m bench.selection_rules bench/results/engine.json \
        bench/results/engine-staged-confirmation.json bench/results/engine-staged2-dev2.json

It did not hold on three held-out sets, so the product went back to the default objective
alone (docs/benchmarks.md §7, *The selection rule*), and back to the rank sum on 2026-12-03
once every recorded study could be replayed (146 runs; *The rank sum of DSV and MMD,
back*; ssad_common.strategy.ranked).

The thirteenth round's guard (DSV chooses, tail-energy vetoes; fixed before its runs,
2026-12-03) was judged by the AUROC of the choice over twelve development runs::

    R=bench/results; .venv/bin/python -m bench.selection_rules $R/engine-dsv-dev-a.json \
        $R/engine-dsv-dev-b.json $R/engine-dsv-dev-seed1.json \
        $R/engine-dsv-dev-oneclass-a.json $R/engine-dsv-dev-oneclass-b.json \
        --versus "dsv, tail-energy guard" "dsv alone"

and changed one choice of twelve, for the worse, so DSV alone stays (*The tail as a guard*).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata, spearmanr

from ssad_common.jobspec import DEFAULT_OBJECTIVE
from ssad_common.strategy import ranked, trust

Trial = dict[str, Any]
Rule = Callable[[Sequence[Trial]], np.ndarray]


@dataclass(frozen=True)
class Named:
    """A rule and the losses it reads: a run that did not record all of them (an
    objective registered after the run) is not replayed for it."""

    rule: Rule
    needs: tuple[str, ...]

#: The rank sum of DSV and MMD: shipped 2026-12-01 to 02, dropped, and back in the
#: fourteenth round (2026-12-03); bench.engine records it under this name.
RANK_SUM = "dsv+mmd ranks"

#: The product's own choice (ssad_common.strategy.ranked), as bench.engine records it
#: beside each objective's argmin: the rank sum (:data:`RANK_SUM`). From 2026-12-02 to
#: 12-03 the product chose by DSV alone, which those runs recorded as "dsv", the objective's
#: argmin (still recorded); result files of 2026-12-01 to 02 and from 2026-12-03 record
#: the rank sum.
RULE = RANK_SUM

#: What drove every study recorded before ``bench.engine --objective`` (2026-12-03).
LEGACY_OBJECTIVE = "dsv"


def study_objective(meta: dict[str, Any]) -> str:
    """The objective that drove a result file's studies (its ``meta``), DSV for the files
    from before ``bench.engine --objective``, whatever the default is now."""
    return str(meta.get("objective", LEGACY_OBJECTIVE))


#: What scored every trial recorded before ``bench.engine --scorer`` (2026-12-03).
LEGACY_SCORER = "mahalanobis"


def study_scorer(meta: dict[str, Any]) -> str:
    """The scorer a result file's trial AUROCs are of (its ``meta``), Mahalanobis for the
    files from before ``bench.engine --scorer``, whatever the default is now."""
    return str(meta.get("scorer", LEGACY_SCORER))


def _ranks(trials: Sequence[Trial], name: str) -> np.ndarray:
    return np.asarray(rankdata([t["losses"][name] for t in trials]), dtype=float)


@dataclass(frozen=True)
class _Row:
    """A recorded trial as ssad_common.strategy.ranked sees it (the default objective's
    loss as the study's)."""

    number: int
    stage: str | None
    validation_loss: float
    losses: dict[str, float]
    trial: Trial


def product_ranking(trials: Sequence[Trial]) -> list[tuple[float, Trial]]:
    """Recorded trials as the product ranks them (ssad_common.strategy.ranked): the
    selectable ones, best first, with their selection scores."""
    return [(score, r.trial) for score, r in ranked(
        _Row(t["number"], t.get("stage"), t["losses"][DEFAULT_OBJECTIVE], t["losses"], t)
        for t in trials)]


def shipped(trials: Sequence[Trial]) -> np.ndarray:
    """The product's own selection scores (:func:`product_ranking`) of ``trials``."""
    score = {t["number"]: v for v, t in product_ranking(trials)}
    return np.array([score[t["number"]] for t in trials])


#: The thirteenth round's candidate (2026-12-03): DSV chooses, ``tail-energy`` only vetoes.
TAIL_GUARD = "dsv, tail-energy guard"


def tail_guard_order(trials: Sequence[Trial]) -> list[int]:
    """The thirteenth round's candidate rule: the indices of ``trials`` best first. A trial
    whose ``tail-energy`` loss is above the median of ``trials``' is vetoed; the others come
    first, by DSV's loss, then the vetoed ones, by DSV's loss (ties: the earlier trial).
    DSV keeps choosing; the tail objective only keeps it off the configurations farthest
    from the test set's tail, where DSV collapsed (docs/benchmarks.md §7, *The tail as a
    guard*). A trial without a finite tail loss is vetoed (the median is of the finite
    ones)."""
    tail = np.array([t["losses"]["tail-energy"] for t in trials], dtype=float)
    finite = np.isfinite(tail)
    vetoed = ~finite
    if finite.any():
        vetoed |= tail > np.median(tail[finite])
    return sorted(range(len(trials)), key=lambda i: (bool(vetoed[i]),
                                                      trials[i]["losses"]["dsv"],
                                                      trials[i]["number"]))


def tail_guard(trials: Sequence[Trial]) -> np.ndarray:
    """:func:`tail_guard_order` as a score per trial (lower is better)."""
    score = np.empty(len(trials))
    score[tail_guard_order(trials)] = np.arange(len(trials))
    return score


def consensus(scores: Sequence[np.ndarray | None], k: int = 3) -> int:
    """The seventeenth round's candidate (2026-12-03, not kept): of the first ``k`` of a
    way of choosing's candidates (their test scores, best first), the index of the medoid,
    the one whose scores agree most (mean Spearman correlation) with the others', the
    earlier on a tie: one detector chosen to stand where the top-k ensemble stands."""
    top = list(scores)[:k]
    if not top:
        raise ValueError("no candidate to choose from")
    if len(top) < 3:  # two cannot outvote each other: the best stays
        return 0
    columns = [s for s in top if s is not None]
    if len(columns) < len(top):
        raise ValueError(f"the top {k} candidates need their scores")
    rho = np.asarray(spearmanr(np.column_stack(columns)).statistic, dtype=np.float64)
    rho = np.nan_to_num(rho, nan=0.0)  # constant scores: no rank agreement
    agreement = (rho.sum(axis=1) - np.diag(rho)) / (len(top) - 1)
    return max(range(len(top)), key=lambda i: (float(agreement[i]), -i))


def rank_sum(*names: str) -> Named:
    """Lowest sum of the trials' ranks under ``names`` (one name: its loss's argmin)."""
    return Named(lambda trials: sum((_ranks(trials, n) for n in names),
                                    np.zeros(len(trials))), names)


#: Every rule compared, in the order they were tried. Ties go to the lower DSV loss.
RULES: dict[str, Named] = {
    "dsv alone": rank_sum(DEFAULT_OBJECTIVE),
    "dsv-discordance": rank_sum("dsv-discordance"),
    "st-ssad": rank_sum("st-ssad"),
    "mean-distance": rank_sum("mean-distance"),
    "mmd": rank_sum("mmd"),
    RANK_SUM: Named(shipped, (DEFAULT_OBJECTIVE, "mmd")),
    "dsv + discordance ranks": rank_sum("dsv", "dsv-discordance"),
    "dsv + discordance + mmd ranks": rank_sum("dsv", "dsv-discordance", "mmd"),
    "all five ranks": rank_sum("dsv", "dsv-discordance", "st-ssad", "mean-distance", "mmd"),
    "discordance + mmd ranks": rank_sum("dsv-discordance", "mmd"),
    "dsv + mean-distance ranks": rank_sum("dsv", "mean-distance"),
    TAIL_GUARD: Named(tail_guard, ("dsv", "tail-energy")),
}


def selectable(result: dict[str, Any]) -> list[Trial]:
    """The trials a result is chosen among: the full-length ones (every trial of the runs
    before the staged strategy, which recorded no stage)."""
    return [t for t in result["trials"] if t.get("stage") != "screen"]


def evaluate(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per rule, per run it can replay (``run``: the run's index in ``results``; ``label``:
    its task, and its file where the run carries one): the pick's AUROC, its regret, and
    the two comparisons."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in RULES}
    for i, r in enumerate(results):
        trials = selectable(r)
        aurocs = np.array([t["auroc"] for t in trials])
        dsv = np.array([t["losses"]["dsv"] for t in trials])
        pixel = max(r["pixel"].values())
        label = r["task"] + (f" ({r['file']})" if "file" in r else "")
        for name, named in RULES.items():
            if not all(n in t["losses"] for t in trials for n in named.needs):
                continue
            pick = int(np.lexsort((dsv, named.rule(trials)))[0])
            out[name].append({"run": i, "label": label, "task": r["task"],
                              "auroc": float(aurocs[pick]),
                              "regret": float(aurocs.max() - aurocs[pick]),
                              "beats_mean": bool(aurocs[pick] > r["mean"]),
                              "above_pixels": bool(aurocs[pick] > pixel)})
    return out


def report(per_rule: dict[str, list[dict[str, Any]]]) -> str:
    """Per rule, over the runs that recorded every loss it needs (``runs``)."""
    lines = ["| rule | runs | median regret | mean regret | beats the mean | above both "
             "pixel baselines |", "|---|---|---|---|---|---|"]
    for name, rows in per_rule.items():
        if not rows:
            lines.append(f"| {name} | 0 (no run recorded {', '.join(RULES[name].needs)}) "
                         "| - | - | - | - |")
            continue
        n = len(rows)
        regrets = [x["regret"] for x in rows]
        lines.append(f"| {name} | {n} | {statistics.median(regrets):.3f} | "
                     f"{statistics.mean(regrets):.3f} | "
                     f"{sum(x['beats_mean'] for x in rows)}/{n} | "
                     f"{sum(x['above_pixels'] for x in rows)}/{n} |")
    return "\n".join(lines)


def head_to_head(per_rule: dict[str, list[dict[str, Any]]], a: str, b: str) -> str:
    """Rule ``a`` against rule ``b``, run by run, by the AUROC of their choices, and how
    often each was higher (the twelfth and thirteenth rounds' judge). Every run given must
    be one both rules can replay."""
    if a not in per_rule or b not in per_rule:
        raise SystemExit(f"--versus: rules are {', '.join(per_rule)}")
    rows_a = {x["run"]: x for x in per_rule[a]}
    rows_b = {x["run"]: x for x in per_rule[b]}
    if rows_a.keys() != rows_b.keys() or not rows_a:
        raise SystemExit(f"--versus: {a!r} replays {len(rows_a)} runs, {b!r} {len(rows_b)}, "
                         f"{len(rows_a.keys() & rows_b.keys())} of them the same; give only "
                         "runs that recorded every loss both need")
    pairs = [(rows_a[k], rows_b[k]) for k in sorted(rows_a)]
    lines = [f"| run | {a} | {b} |", "|---|---|---|"]
    lines += [f"| {x['label']} | {x['auroc']:.3f} | {y['auroc']:.3f} |" for x, y in pairs]
    wins = sum(x["auroc"] > y["auroc"] for x, y in pairs)
    losses = sum(x["auroc"] < y["auroc"] for x, y in pairs)
    mean_a = statistics.fmean(x["auroc"] for x, _ in pairs)
    mean_b = statistics.fmean(y["auroc"] for _, y in pairs)
    lines += ["", f"{len(pairs)} runs: {a} higher on {wins}, {b} on {losses}, "
              f"{len(pairs) - wins - losses} ties; mean AUROC {mean_a:.3f} against "
              f"{mean_b:.3f} ({mean_a - mean_b:+.3f})"]
    return "\n".join(lines)


def trust_summary(results: Sequence[dict[str, Any]], rule: str = RULE) -> str:
    """Per verdict of ``selection.trust`` (ssad_common.strategy.trust of the recorded
    agreement of the top 3): tasks, regret, how often the choice beat fixed CutPaste and
    how often the top-3 ensemble beat the choice, each run read as ``rule`` chose (the
    product's, :data:`RULE`, by default), where the run recorded its decisiveness."""
    rows = []
    for r in results:
        o = r["objectives"].get(rule, {})
        if "decisiveness" in o:
            rows.append((trust(o["decisiveness"]["agreement_jaccard"]), o, r["fixed_cutpaste"]))
    lines = [f"{len(rows)} task runs with the agreement recorded (as {rule} chose)", "",
             "| trust | tasks | median regret | largest regret | beats fixed cutpaste | "
             "top-3 ensemble beats the choice |", "|---|---|---|---|---|---|"]
    for verdict in ("decisive", "uncertain"):
        group = [(o, fixed) for v, o, fixed in rows if v == verdict]
        if not group:
            lines.append(f"| {verdict} | 0 | - | - | - | - |")
            continue
        regrets = [o["regret"] for o, _ in group]
        beats = sum(o["selected"]["auroc"] > fixed for o, fixed in group)
        ens = sum(o["ensemble_top"] > o["selected"]["auroc"] for o, _ in group)
        lines.append(f"| {verdict} | {len(group)} | {statistics.median(regrets):.3f} | "
                     f"{max(regrets):.3f} | {beats}/{len(group)} | {ens}/{len(group)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="bench.engine result files")
    ap.add_argument("--trust", action="store_true",
                    help="also the trust verdict's record (selection.trust) on these runs")
    ap.add_argument("--rule", default=RULE,
                    help=f"with --trust: read each run as this recorded way of choosing chose "
                         f"(default {RULE}, the product's; 'dsv+mmd ranks' for the rank-sum "
                         f"rule of 2026-12-01, in the runs of then)")
    ap.add_argument("--versus", nargs=2, metavar=("A", "B"),
                    help="rule A against rule B, run by run, by the AUROC of the choice")
    args = ap.parse_args(argv)
    results = [{**r, "file": f.name} for f in args.results
               for r in json.loads(f.read_text())["results"]]
    per_rule = evaluate(results)
    print(report(per_rule))
    if args.versus:
        print()
        print(head_to_head(per_rule, *args.versus))
    if args.trust:
        print()
        print(trust_summary(results, args.rule))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
