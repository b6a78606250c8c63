"""A job's report: one self-contained HTML page (``GET /v1/jobs/{id}/report``).

Everything it shows is inlined: the plots as ``data:`` PNGs, the styles and the script in
the page, so it works with no internet, can be saved as one file, and is served under a
Content-Security-Policy that lets it load nothing from anywhere else. While the job runs,
the page follows its progress stream (server-sent events) and redraws the status, the
progress bar, the best trial and the trials table in place; when the job ends it reloads
once to show the final plots. Its links (the stream, the downloads) carry the report
link's token when the page was opened with one (service/links.py).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.orm import Session

from service.errors import AppError
from service.jobs import service
from service.jobs.cache import RENDERED
from service.jobs.render import job_out, plot_png, trial_out
from service.jobs.schemas import JobOut, SelectionOut
from ssad_common.lifecycle import TERMINAL
from ssad_common.models import Job, JobTrial
from ssad_tune.client import fmt_duration, gap_words

#: Content-Security-Policy of the page: nothing from elsewhere, only its own inline parts,
#: its inlined images and requests to this server (the stream, the trials).
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'")

PLOTS = (
    ("history", "Optimisation history", "each full-length trial's validation loss and the "
                                        "lowest so far (a short screen trial cannot be the "
                                        "result; the best is ranked by loss and MMD "
                                        "together)"),
    ("slice", "Loss against each hyperparameter", "Optuna's slice plot: the patch size of "
                                                  "each local family, the other families' "
                                                  "parameters"),
    ("trials", "Trials by family", "validation loss of every finished trial; the best starred"),
    ("importances", "Hyperparameter importances", "for a job that searched one family"),
    ("scores", "Test scores", "histogram of the anomaly scores with both label-free "
                              "thresholds"),
    ("top", "Most anomalous test images", "the highest scores, with their names"),
    ("augmentation", "What the chosen augmentation does", "train images and their "
                                                          "augmented versions"),
)
TOP_ROWS = 25
_HERE = Path(__file__).parent
STYLE = (_HERE / "report.css").read_text()
SCRIPT = (_HERE / "report.js").read_text()


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _when(at: datetime | None) -> str:
    return "–" if at is None else at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    return "–" if seconds is None else fmt_duration(seconds)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v, 3) if isinstance(v, float) else v}"
                     for k, v in sorted(params.items())) or "defaults"


def _verdict(sel: SelectionOut | None) -> str:
    """How much to trust the choice, in a sentence (docs/benchmarks.md §7's reading)."""
    if sel is None:
        return "No decisiveness figures: the job has not succeeded, or had one candidate."
    share, agree = sel.family_gap_share, sel.agreement_jaccard
    parts = []
    if sel.runner_up_family is not None and sel.family_gap is not None:
        parts.append(f"the runner-up family, {escape(sel.runner_up_family)}, is "
                     f"{gap_words(sel.family_gap, sel.family_gap_unit)}"
                     + ("" if share is None else f" ({share:.0%} of the candidates' range)"))
    if agree is not None:
        parts.append(f"the top {sel.top_k} configurations agree on {agree:.0%} of the "
                     "images they flag")
    advice = ("One candidate: nothing to compare the choice with." if sel.trust is None else
              "The choice is decisive." if sel.trust == "decisive" else
              "The choice is uncertain: the tuned detector may be no better than its "
              "runner-up; consider the ensemble of the top configurations "
              f"(scores?ensemble={sel.top_k}).")  # >= 2: a verdict needs two
    return (("; ".join(parts).capitalize() + ". ") if parts else "") + advice


class Page:
    """The report of one job, rendered from the database as the caller may read it."""

    def __init__(self, session: Session, tenant_id: str, job_id: str,
                 token: str | None) -> None:
        self.session, self.tenant_id, self.job_id, self.token = (session, tenant_id, job_id,
                                                                 token)
        self.job: Job = service.get_job(session, tenant_id, job_id)
        self.out: JobOut = job_out(self.job)
        self.trials: Sequence[JobTrial] = service.list_trials(session, tenant_id, job_id)

    def url(self, path: str, **params: Any) -> str:
        query = {k: v for k, v in params.items() if v is not None}
        if self.token:
            query["token"] = self.token
        return f"/v1/jobs/{self.job_id}{path}" + (f"?{urlencode(query)}" if query else "")

    # ------------------------------------------------------------------ sections

    def header(self) -> str:
        j, o = self.job, self.out
        workers = sorted({t.worker_id for t in self.trials if t.worker_id}
                         | ({j.worker_id} if j.worker_id else set()))
        waited = (j.started_at - j.created_at).total_seconds() if j.started_at else None
        ran = ((j.finished_at - j.started_at).total_seconds()
               if j.started_at and j.finished_at else None)
        rows = [("Status", f'<span id="status" class="status {o.status}">{o.status}</span>'
                 + (f' <span class="err">{escape(j.error)}</span>' if j.error else "")),
                ("Kind", o.kind),
                ("Created", _when(j.created_at)),
                ("Started", f"{_when(j.started_at)} (queued {_duration(waited)})"),
                ("Finished", f"{_when(j.finished_at)} (ran {_duration(ran)})"),
                ("Training time", f"{_duration(j.train_seconds_done)} over "
                                  f"{j.train_steps_done:,} steps"),
                ("Worker(s)", escape(", ".join(workers)) or "–"),
                ("Datasets", f"train {escape(j.train_dataset_id)}, test "
                             f"{escape(j.test_dataset_id)}")]
        return _table(rows)

    def progress(self) -> str:
        p = self.out.progress
        planned = p.trials_planned or p.n_trials
        return (f'<div class="bar"><div id="bar" style="width:'
                f'{100 * _fraction(self.out):.1f}%"></div></div>'
                f'<p id="progress">{_progress_text(self.out)}</p>'
                f'<p class="muted">{p.trials_completed} of {planned} trials finished</p>')

    def chosen(self) -> str:
        best = self.out.best
        if best is None:
            return '<p id="best">No trial has finished yet.</p>'
        spec = self.job.spec or {}
        return (f'<p id="best" class="chosen"><b>{escape(best.augmentation)}</b> '
                f"({escape(_params(best.params))}), validation loss "
                f"{_fmt(best.validation_loss)}, trial {best.trial_number}</p>"
                f"<p>Objective {escape(str(spec.get('objective', '–')))}, detector "
                f"{escape(str(spec.get('detector', 'small')))}, strategy "
                f"{escape(str(spec.get('strategy', '–')))}.</p>"
                f"<p>{_verdict(self.out.selection)}</p>")

    def plan(self) -> str:
        plan = self.out.plan
        if plan is None:
            return ""
        skipped = (f" Never tried (budget too small): {escape(', '.join(plan.skipped_families))}."
                   if plan.skipped_families else "")
        return (f"<p>Budget: {plan.budget_trial_equivalents} full-length trials = "
                f"{plan.budget_train_steps:,} training steps ({plan.strategy}: screen "
                f"{plan.screen.trials} × {plan.screen.train_steps_each} steps, refine "
                f"{plan.refine.trials} × {plan.refine.train_steps_each} steps).{skipped}</p>")

    def plots(self) -> str:
        """The plots section. An ended job's plots never change: drawn once per process
        (service/jobs/cache.py), like the score bodies; a running job's each time."""
        if self.job.status in TERMINAL:
            return RENDERED.get((self.job_id, self.job.best_trial_number or -1, "report-plots"),
                                lambda: self._draw_plots().encode()).decode()
        return self._draw_plots()

    def _draw_plots(self) -> str:
        parts = []
        for name, title, what in PLOTS:
            try:
                png = plot_png(self.session, self.tenant_id, self.job_id, name, 16)
            except AppError as exc:
                parts.append(f'<figure class="missing" id="plot-{name}"><figcaption><b>'
                             f"{title}</b>: not available ({escape(exc.detail)})"
                             "</figcaption></figure>")
                continue
            data = base64.b64encode(png).decode()
            parts.append(f'<figure id="plot-{name}"><img alt="{title}" '
                         f'src="data:image/png;base64,{data}"><figcaption><b>{title}</b>: '
                         f"{what}</figcaption></figure>")
        return '<div class="plots">' + "".join(parts) + "</div>"

    def thresholds(self) -> str:
        try:
            found = service.threshold(self.session, self.tenant_id, self.job_id, None)
            number = service.best_trial(self.session, self.tenant_id, self.job_id)
            _, rows = service.scores(self.session, self.tenant_id, self.job_id, number)
        except AppError as exc:
            return f"<p>Not yet: {escape(exc.detail)}</p>"
        rules = [(f"{r['rule']}{' (suggested)' if r['rule'] == found['suggested_rule'] else ''}",
                  f"{_fmt(r['threshold'])}: flags {r['n_flagged']} of {len(rows)} — "
                  f"{escape(r['description'])}") for r in found["rules"]]
        top = sorted(rows, key=lambda r: -r[2])[:TOP_ROWS]
        cut = next(r["threshold"] for r in found["rules"]
                   if r["rule"] == found["suggested_rule"])
        body = "".join(f"<tr{' class=flag' if s > cut else ''}><td>{i}</td>"
                       f"<td>{escape(n)}</td><td>{_fmt(s)}</td></tr>" for i, n, s in top)
        return (_table(rules) + f"<h3>The {len(top)} highest scores</h3>"
                '<table class="grid" id="top"><thead><tr><th>index</th><th>image</th>'
                f"<th>score</th></tr></thead><tbody>{body}</tbody></table>"
                '<p class="muted">Rows above the suggested threshold are marked.</p>')

    def trials_table(self) -> str:
        return ('<table class="grid" id="trials"><thead><tr><th>#</th><th>stage</th>'
                "<th>family</th><th>parameters</th><th>loss</th><th>steps</th>"
                "<th>duration</th><th>worker</th><th>state</th></tr></thead><tbody>"
                + "".join(_trial_row(t, t.number == self.job.best_trial_number)
                          for t in self.trials) + "</tbody></table>")

    def downloads(self) -> str:
        links = [("scores (CSV)", self.url("/scores", format="csv")),
                 ("scores (JSON)", self.url("/scores")),
                 ("trials (JSON)", self.url("/trials")),
                 ("threshold and flagged images (JSON)", self.url("/threshold")),
                 ("history of status changes (JSON)", self.url("/events")),
                 ("webhook deliveries (JSON)", self.url("/deliveries")),
                 ("the job (JSON)", self.url(""))]
        return "<ul>" + "".join(f'<li><a href="{escape(u)}">{t}</a></li>'
                                for t, u in links) + "</ul>"

    def render(self) -> str:
        config = {"status": self.out.status, "stream": self.url("/stream"),
                  "trials": self.url("/trials"), "terminal": sorted(s.value for s in TERMINAL),
                  "completed": self.out.progress.trials_completed,
                  "best_trial": self.job.best_trial_number}
        sections = [("Job", self.header()), ("Progress", self.progress()),
                    ("Chosen configuration", self.chosen() + self.plan()),
                    ("Loss landscape and scores", self.plots()),
                    ("Thresholds and anomalous images", self.thresholds()),
                    ("Trials", self.trials_table()), ("Downloads", self.downloads())]
        body = "".join(f"<section><h2>{t}</h2>{html}</section>" for t, html in sections)
        data = json.dumps(config).replace("</", "<\\/")
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f'<link rel="icon" href="data:,"><title>ssad-tune job '
                f"{escape(self.job_id)}</title><style>{STYLE}</style></head><body>"
                f"<h1>ssad-tune report <small>{escape(self.job_id)}</small></h1>{body}"
                f'<script type="application/json" id="config">{data}</script>'
                f"<script>{SCRIPT}</script></body></html>")


def _table(rows: list[tuple[str, str]]) -> str:
    return ('<table class="kv">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>"
                                           for k, v in rows) + "</table>")


def _fraction(o: JobOut) -> float:
    p = o.progress
    if o.status == "succeeded":
        return 1.0
    if p.train_steps_planned:
        return min(1.0, p.train_steps_done / p.train_steps_planned)
    planned = p.trials_planned or p.n_trials
    return min(1.0, p.trials_completed / planned) if planned else 0.0


def _progress_text(o: JobOut) -> str:
    p = o.progress
    text = f"{p.train_steps_done:,} of {p.train_steps_planned or 0:,} training steps"
    if p.estimated_remaining_s is not None:
        text += f", about {_duration(p.estimated_remaining_s)} left"
    current = p.current_trial
    if current and o.status == "running":
        text += f"; trial {current.number} at step {current.step}/{current.steps}"
    return text


def _trial_row(t: JobTrial, best: bool) -> str:
    o = trial_out(t)
    return (f"<tr{' class=best' if best else ''}><td>{o.number}</td><td>{o.stage or '–'}</td>"
            f"<td>{escape(o.augmentation)}</td><td>{escape(_params(o.params))}</td>"
            f"<td>{_fmt(o.validation_loss)}</td><td>{o.train_steps or '–'}</td>"
            f"<td>{_duration(o.duration_s)}</td><td>{escape(o.worker or '–')}</td>"
            f"<td>{o.state}</td></tr>")


def render_report(session: Session, tenant_id: str, job_id: str, token: str | None) -> str:
    return Page(session, tenant_id, job_id, token).render()
