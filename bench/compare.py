"""Compare study designs over several runs of ``bench.engine`` (tasks × study seeds).

Each ``--design NAME=FILE[,FILE...]`` names one design and the engine results it ran
(one file per study seed, say). For every design the command prints, over all its
injected-task runs and by the objective that chooses (by default the one that drove each
run's study): the median and mean regret to the study's own oracle, the mean AUROC of the
selection, how often it found the generating family (and the size within 1.5×), beat its
study's mean over configurations, and was above both pixel baselines; then each task's
selection per run.
It reads labels only through the engine's stored AUROCs (bench/ only)::

    .venv/bin/python -m bench.compare \\
        --design anywhere=engine-staged2-dev2.json,engine-anywhere-seed1-dev.json \\
        --design fills=engine-fills-seed0-dev.json,engine-fills-seed1-dev.json

The default judge is the argmin of the objective that drove the study, so that the
figures documented for older files reproduce; the product's own choice since 2026-12-03,
the rank sum of DSV and MMD, is ``--objective "dsv+mmd ranks"`` (recorded by runs from
then, and by those of 2026-12-01 to 02).

``--all-kinds`` counts the one-class runs too (their family columns count nothing);
``--output ensemble`` judges the top-3 ensemble each run recorded for the judged way of
choosing (``?ensemble=3``: the mean z-score of the first three full-length configurations
in its order) instead of the single choice (it is no one family or size, so those columns
count nothing). ``--output oracle`` judges each run's best full-length trial by AUROC (a
label's choice, so no product may make it; a tie goes to the generator's configuration): the
AUROC ceiling of any way of choosing among the trials trained, and what the best detector
was, so its family-and-size column says how often the best detector is the generator's. It
also prices that bar: how many studies trained the generator's family at a size within 1.5×
(the most any choice among their trials can name), and that trial's regret.

The same study found in two files of a design (a run judged again under another rule) is
counted once, with a note on stderr.

``--output advice`` follows the README's advice run by run: the single choice where the
trust verdict the run recorded is ``decisive`` (or was not recorded), the top-3 ensemble
where it is ``uncertain``.

``--by-trust`` splits every design's runs by the label-free trust verdict (README,
*decisiveness*) that the judged way of choosing recorded for each: how the choice (or, with
``--output``, the ensemble or the ceiling) fared where the product called its choice
``decisive`` and where ``uncertain``.

``--output consensus`` judges the seventeenth round's candidate, recorded by runs from
then: the medoid of the first three full-length configurations in the judged order, the
one whose test scores agree most (mean Spearman) with the other two's; one trained detector,
chosen to stand where the ensemble stands. ``consensus-5``: the medoid of five.

Runs record their scorer (``meta.scorer``; before the fifteenth round every run was
Mahalanobis's). ``--scorer mahalanobis`` reads every run as Mahalanobis's: runs made with
another scorer through the AUROCs their trials recorded for it (``bench.engine
--also-score``): the same choices, their AUROCs under that scorer. Each design's row names
its scorers, so old and new runs are not compared under different scorers unnoticed.

A file name that is not a path to a file is looked up in ``bench/results/``. Rows are
matched by task name; a design missing a task's run is reported as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.selection_rules import LEGACY_SCORER, selectable, study_objective, study_scorer
from bench.tasks import within
from worker.core.selection import TOP_K

RESULTS = Path(__file__).parent / "results"
SHORT = {"cutout": "CO", "cutpaste": "CP", "cutpaste-scar": "scar"}
#: ``--output`` values that judge the medoid of the top k (bench.selection_rules.consensus)
CONSENSUS = {"consensus": TOP_K, "consensus-5": 5}


def rescored(r: dict[str, Any], scorer: str) -> dict[str, Any]:
    """The run ``r`` as if every trial's detector had been scored by ``scorer``, from the
    AUROCs ``bench.engine --also-score`` recorded (the choices do not change: the losses
    read the embeddings; the oracle, the mean and each choice's AUROC and regret do)."""
    if not all(scorer in t.get("auroc_by_scorer", {}) for t in r["trials"]):
        raise SystemExit(f"{r['task']}: this run did not record the {scorer!r} scorer's "
                         "AUROC of every trial (bench.engine --also-score)")
    auroc = {t["number"]: t["auroc_by_scorer"][scorer] for t in r["trials"]}
    pool = [auroc[t["number"]] for t in selectable(r)]
    trials = [{**t, "auroc": auroc[t["number"]]} for t in r["trials"]]
    objectives = {}
    for name, chosen in r["objectives"].items():
        sel = {**chosen["selected"], "auroc": auroc[chosen["selected"]["number"]]}
        # the trust verdict read on that scorer's scores, where the run recorded it
        verdict = chosen.get("by_scorer", {}).get(scorer, {}).get("decisiveness")
        # the ensemble and the consensus are of the run's own scores: not read as another's
        objectives[name] = {**chosen, "selected": sel, "regret": max(pool) - sel["auroc"],
                            "ensemble_top": None, "decisiveness": verdict,
                            **({"consensus": None} if "consensus" in chosen else {})}
    return {**r, "oracle": max(pool), "mean": statistics.fmean(pool),
            "objectives": objectives, "trials": trials}


def runs_of(files: list[Path], tasks: set[str] | None, all_kinds: bool = False,
            scorer: str | None = None) -> list[dict[str, Any]]:
    """The runs in ``files``, each with ``study_objective``: the loss that drove its study
    (runs from before ``bench.engine --objective`` were all driven by DSV); with
    ``scorer``, read as that scorer's (:func:`rescored`)."""
    out = []
    seen: dict[str, str] = {}
    for f in files:
        saved = json.loads((f if f.is_file() else RESULTS / f).read_text())
        drove = study_objective(saved.get("meta", {}))
        own = study_scorer(saved.get("meta", {}))
        for r in saved["results"]:
            if (all_kinds or r["kind"] == "injected") and (not tasks or r["task"] in tasks):
                key = fingerprint(r)
                if key in seen:  # the same study in two files (a run judged again)
                    print(f"note: {r['task']} in {f} repeats the run in {seen[key]}; "
                          "counted once", file=sys.stderr)
                    continue
                seen[key] = str(f)
                out.append({**(rescored(r, scorer) if scorer and scorer != own else r),
                            "study_objective": drove, "scorer": scorer or own})
    return out


def fingerprint(r: dict[str, Any]) -> str:
    """One study's identity: its task and every trial's configuration and AUROC (a run
    judged again under another rule is written again with the same trials)."""
    return json.dumps([r["task"], [[t.get("augmentation"), t.get("params"), t.get("auroc")]
                                   for t in r["trials"]]], sort_keys=True)


def is_family(trial: dict[str, Any], truth: dict[str, Any]) -> bool:
    """Whether a trial is of the generating family (never, on a one-class task)."""
    return bool(truth) and trial["augmentation"] == truth["augmentation"]


def is_generator(trial: dict[str, Any], truth: dict[str, Any]) -> bool:
    """Whether a trial is the generating family with the patch size within 1.5× of the
    defect's (the issue's family-and-size bar)."""
    if not is_family(trial, truth):
        return False
    ps = trial["params"].get("patch_size")
    return ps is not None and within(float(ps), truth["patch_size"], 1.5)


def oracle_trial(r: dict[str, Any]) -> dict[str, Any]:
    """The run's best full-length trial by AUROC (labels: benchmarks only). Among trials
    tied at the best AUROC the generator's (:func:`is_generator`) is taken, then the
    earliest, so a tie never hides that the generator's configuration was as good."""
    truth = r["truth"] or {}
    return max(selectable(r), key=lambda t: (t["auroc"], is_generator(t, truth)))


def as_choice(r: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    """``trial`` judged as if a way of choosing had picked it: its regret to the oracle."""
    return {"selected": trial, "regret": r["oracle"] - trial["auroc"]}


def trust_of(r: dict[str, Any], objective: str | None) -> str:
    """The trust verdict the judged way of choosing recorded for the run (``decisive`` or
    ``uncertain``; ``not recorded`` for runs from before the verdict, or read under a
    scorer whose verdict the run did not keep)."""
    chosen = r["objectives"].get(objective or r["study_objective"]) or {}
    return (chosen.get("decisiveness") or {}).get("trust") or "not recorded"


def judged(r: dict[str, Any], objective: str | None, output: str = "choice"
           ) -> dict[str, Any]:
    truth = r["truth"] or {}
    trust = trust_of(r, objective)
    if output == "advice":  # the README's advice followed: the ensemble where uncertain
        output = "ensemble" if trust == "uncertain" else "choice"
    if output == "oracle":  # the AUROC ceiling: what the best detector trained is
        chosen = as_choice(r, oracle_trial(r))
        sel = chosen["selected"]
    else:
        name = objective or r["study_objective"]
        if name not in r["objectives"]:
            raise SystemExit(f"{r['task']}: this run recorded no {name!r} choice (it has "
                             f"{', '.join(r['objectives'])}); --objective names one of those")
        chosen = r["objectives"][name]
        sel = chosen["selected"]
        if output in CONSENSUS:  # the medoid of the way of choosing's top k
            if "consensus" not in chosen:
                raise SystemExit(f"--output {output}: {r['task']}'s run recorded no "
                                 "consensus pick (bench.engine records it from the "
                                 "seventeenth round)")
            if chosen["consensus"] is None:
                raise SystemExit(f"--output {output}: the consensus was recorded for the "
                                 "run's own scorer only (leave out --scorer)")
            number = chosen["consensus"].get(str(CONSENSUS[output]))
            if number is None:
                raise SystemExit(f"--output {output}: {r['task']}'s run recorded the "
                                 f"consensus of {', '.join(chosen['consensus'])} only")
            chosen = as_choice(r, next(t for t in r["trials"] if t["number"] == number))
            sel = chosen["selected"]
    if output == "ensemble":
        if chosen["ensemble_top"] is None:
            raise SystemExit("--output ensemble: the ensemble's AUROC was recorded for the "
                             "run's own scorer only (leave out --scorer)")
        auroc = float(chosen["ensemble_top"])
        family = size = False
        regret, label = r["oracle"] - auroc, "top-3 ensemble"
    else:
        auroc, regret = sel["auroc"], chosen["regret"]
        ps = sel["params"].get("patch_size")
        family, size = is_family(sel, truth), is_generator(sel, truth)
        fill = sel["params"].get("fill")
        label = (f"{SHORT.get(sel['augmentation'], sel['augmentation'])}"
                 f"{'' if fill is None else ' ' + str(fill)}"
                 f"{'' if ps is None else f' {float(ps):.3f}'}")
    generator = [t["auroc"] for t in selectable(r) if is_generator(t, truth)]
    return {"task": r["task"], "scorer": r.get("scorer", LEGACY_SCORER),
            "injected": r.get("kind") == "injected",
            "generator_regret": r["oracle"] - max(generator) if generator else None,
            "family_refined": any(is_family(t, truth) for t in selectable(r)),
            "auroc": auroc, "regret": regret, "family": family,
            "size": size, "beats_mean": auroc > r["mean"],
            "above_pixels": auroc > max(r["pixel"].values()), "label": label,
            "trust": trust}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    return {"runs": n,
            "median_regret": statistics.median(r["regret"] for r in rows),
            "mean_regret": statistics.fmean(r["regret"] for r in rows),
            "mean_auroc": statistics.fmean(r["auroc"] for r in rows),
            "family": sum(r["family"] for r in rows),
            "family_and_size": sum(r["size"] for r in rows),
            "auroc_095": sum(r["auroc"] >= 0.95 for r in rows),
            "beats_mean": sum(r["beats_mean"] for r in rows),
            "above_pixels": sum(r["above_pixels"] for r in rows)}


def tagged(name: str, rows: list[dict[str, Any]]) -> str:
    """A design's name with its scorers where they are not the record's usual one."""
    scorers = sorted({r["scorer"] for r in rows})
    if scorers == [LEGACY_SCORER]:
        return name
    return f"{name} [{'MIXED: ' if len(scorers) > 1 else ''}{', '.join(scorers)}]"


def print_generator_cost(designs: dict[str, list[dict[str, Any]]]) -> None:
    """What choosing the generator's configuration would cost: over the injected runs whose
    study trained the generating family at a size within 1.5× of the defect's, the regret
    of the best such trial (labels again: the price of the family-and-size bar in AUROC)."""
    print()
    print("| design | injected runs | with the generator's family and size trained | "
          "the best such trial's median regret | mean regret | regret > 0.02 | the others: "
          "the family never trained at full length |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in designs.items():
        name = tagged(name, rows)
        injected = [r for r in rows if r["injected"]]
        cost = [r["generator_regret"] for r in injected if r["generator_regret"] is not None]
        others = [r for r in injected if r["generator_regret"] is None]
        unrefined = f"{sum(not r['family_refined'] for r in others)}/{len(others)}"
        if not cost:
            print(f"| {name} | {len(injected)} | 0 | — | — | — | {unrefined} |")
            continue
        print(f"| {name} | {len(injected)} | {len(cost)} | {statistics.median(cost):.3f} | "
              f"{statistics.fmean(cost):.3f} | {sum(c > 0.02 for c in cost)}/{len(cost)} | "
              f"{unrefined} |")


def print_by_trust(designs: dict[str, list[dict[str, Any]]]) -> None:
    """Each design's runs split by the trust verdict their way of choosing recorded (a
    label-free verdict, read here against the labels: how far a user may trust it)."""
    print()
    print("| design | trust verdict | runs | median regret | largest regret | regret > 0.02 "
          "| beats its study's mean | above both pixel baselines |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in designs.items():
        name = tagged(name, rows)
        for verdict in sorted({r["trust"] for r in rows}):
            part = [r for r in rows if r["trust"] == verdict]
            s, n = summary(part), len(part)
            print(f"| {name} | {verdict} | {n} | {s['median_regret']:.3f} | "
                  f"{max(r['regret'] for r in part):.3f} | "
                  f"{sum(r['regret'] > 0.02 for r in part)}/{n} | "
                  f"{s['beats_mean']}/{n} | {s['above_pixels']}/{n} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--design", action="append", required=True, metavar="NAME=FILES",
                    help="a design's name and its engine results, comma-separated")
    ap.add_argument("--objective", default=None,
                    help="judge this objective's choice among each run's trials (default: "
                    "the objective that drove the run's study, DSV unless the run says)")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    ap.add_argument("--all-kinds", action="store_true",
                    help="the one-class runs too (default: injected tasks only)")
    ap.add_argument("--output", choices=("choice", "ensemble", "advice", "oracle",
                                         *CONSENSUS),
                    default="choice",
                    help="judge the single choice (default), the recorded top-3 ensemble, "
                    "the advice (the choice where its run's trust verdict is decisive, the "
                    "ensemble where it is uncertain), "
                    "the oracle: each run's best trial by AUROC (labels), the AUROC "
                    "ceiling of any choice among the trials trained, or the consensus "
                    "(-5): the medoid of the top 3 (5), the trial whose test scores agree "
                    "most with the others'")
    ap.add_argument("--scorer", default=None,
                    help="read every run as if scored by this scorer, from the AUROCs its "
                    "trials recorded for it (bench.engine --also-score; default: the run's)")
    ap.add_argument("--by-trust", action="store_true",
                    help="also split each design's runs by the trust verdict (decisive, "
                    "uncertain) the judged way of choosing recorded for them")
    args = ap.parse_args(argv)
    tasks = set(filter(None, args.tasks.split(","))) or None
    designs: dict[str, list[dict[str, Any]]] = {}
    for spec in args.design:
        name, eq, files = spec.partition("=")
        if not eq or not files:
            ap.error(f"--design {spec!r}: give NAME=FILE[,FILE...]")
        designs[name] = [judged(r, args.objective, args.output)
                         for r in runs_of([Path(f) for f in files.split(",")], tasks,
                                          args.all_kinds, args.scorer)]
        if not designs[name]:
            ap.error(f"--design {name!r}: no {'' if args.all_kinds else 'injected-task '}run "
                     f"in {files}"
                     + (f" among {sorted(tasks)}" if tasks else ""))
    print("| design | runs | median regret | mean regret | mean AUROC | family | family and "
          "size within 1.5× | AUROC ≥ 0.95 | beats its study's mean | above both pixel "
          "baselines |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in designs.items():
        s = summary(rows)
        name = tagged(name, rows)
        print(f"| {name} | {s['runs']} | {s['median_regret']:.3f} | {s['mean_regret']:.3f} | "
              f"{s['mean_auroc']:.3f} | {s['family']}/{s['runs']} | "
              f"{s['family_and_size']}/{s['runs']} | {s['auroc_095']}/{s['runs']} | "
              f"{s['beats_mean']}/{s['runs']} | {s['above_pixels']}/{s['runs']} |")
    if args.output == "oracle":
        print_generator_cost(designs)
    if args.by_trust:
        print_by_trust(designs)
    print()
    names = list(designs)
    order = list(dict.fromkeys(r["task"] for rows in designs.values() for r in rows))
    print("| task | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for task in order:
        cells = []
        for name in names:
            got = [r for r in designs[name] if r["task"] == task]
            cells.append(" / ".join(f"{r['auroc']:.3f} {r['label']}{'*' if r['size'] else ''}"
                                    for r in got) or "(not run)")
        print(f"| {task} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
