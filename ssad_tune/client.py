"""``ssad-tune tune TRAIN TEST``: the HTTP client for people at a terminal.

Uploads both files, creates the job, follows its progress live (server-sent events, with a
progress bar: trials done / total, the running trial's step and training loss, the best
trial's loss so far, elapsed, ETA from the training-step rate), then writes the scores
CSV and prints the best configuration and the suggested threshold. Talks to any server:
``--url``, else ``SSAD_URL``, else ``SSAD_HOST``/``SSAD_PORT`` (the variables ``ssad-tune
serve`` reads), else http://127.0.0.1:8000; the API key comes from ``SSAD_API_KEY``. Every
creating request carries an ``Idempotency-Key``, so the client retries connection errors
and 503s without ever creating a second dataset or job.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO, TypedDict, cast

import httpx
import numpy as np
from httpx_sse import connect_sse

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
WHERE = ("point the client at the server with --url URL or SSAD_URL=URL (or SSAD_HOST and "
         "SSAD_PORT, as given to `ssad-tune serve`)")


def default_url(env: Mapping[str, str] = os.environ) -> str:
    """The server to talk to: ``SSAD_URL``; else ``SSAD_HOST``/``SSAD_PORT``, the address
    ``ssad-tune serve`` listens on (a wildcard bind address means this machine); else
    http://127.0.0.1:8000."""
    if env.get("SSAD_URL"):
        return env["SSAD_URL"]
    host = env.get("SSAD_HOST") or DEFAULT_HOST
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{env.get('SSAD_PORT') or DEFAULT_PORT}"


class ClientError(Exception):
    """What to tell the user (the server's error detail, or why it could not be reached)."""


class DatasetInfo(TypedDict, total=False):
    """``POST /v1/datasets``'s answer (the fields a client uses; the server sends more)."""

    id: str
    name: str
    n_samples: int
    channels: int
    height: int
    width: int


class JobInfo(TypedDict, total=False):
    """A job as ``GET /v1/jobs/{id}`` returns it (the fields a client uses)."""

    id: str
    kind: str
    status: str
    progress: dict[str, Any]
    best: dict[str, Any] | None
    selection: dict[str, Any] | None
    plan: dict[str, Any] | None
    error: str | None
    report_url: str


#: What :meth:`Client.upload` takes: a file (.npz, .npy, .zip of images, or one image), a
#: folder of images (zipped on the fly, names relative to it), or an array (N, H, W) or
#: (N, C, H, W) of uint8.
Source = str | os.PathLike[str] | np.ndarray
# What the server decodes: a copy of ssad_common.images.IMAGE_SUFFIXES (the client wheel
# does not ship ssad_common, as for the --ensemble bounds in cli.py).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Images the server does not read: a folder holding them is refused, not partly uploaded.
OTHER_IMAGE_SUFFIXES = (".bmp", ".gif", ".tif", ".tiff", ".webp")


class Client:
    """A typed client of the ssad-tune API (torch-free; httpx, numpy).

    ``url`` defaults to :func:`default_url` (``SSAD_URL`` ...), ``api_key`` to
    ``SSAD_API_KEY``. Creating requests carry an ``Idempotency-Key``, so connection errors and
    503s are retried without creating anything twice. Use it as a context manager, or call
    :meth:`close`::

        with Client() as c:
            job = c.create_job(c.upload("train/good"), c.upload("test/mixed"), n_trials=12)
            job = c.wait(job["id"], progress=lambda j: print(j["progress"]))
            scores = c.scores(job["id"])            # numpy, in test order
            print(c.report_url(job["id"]))          # open in a browser
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 300.0, retries: int = 5) -> None:
        url = url or default_url()
        api_key = api_key if api_key is not None else os.environ.get("SSAD_API_KEY") or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_key = api_key
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries
        self.reached = False  # has any request got an answer from the server yet?

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried on connection errors and 503 (with the same headers, so a
        keyed POST is replayed, not repeated); any other error becomes a ClientError."""
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                # Nothing listening before the server ever answered: a wrong address, not a
                # restart to wait out. Say so at once instead of after a minute of retries.
                never = not self.reached and isinstance(exc, httpx.ConnectError)
                if attempt == self.retries or never:
                    raise ClientError(f"cannot reach the server at {self.http.base_url} "
                                      f"({exc}); is it running? {WHERE}") from None
            else:
                self.reached = True
                if r.status_code != 503 or attempt == self.retries:
                    if r.status_code >= 400:
                        raise ClientError(_detail(r))
                    return r
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
        raise AssertionError("unreachable")

    def upload(self, source: Source, name: str | None = None) -> DatasetInfo:
        """Upload images as a dataset; see :data:`Source` for what it takes."""
        filename, data = _encode(source, name)
        r = self.request("POST", "/v1/datasets", files={"file": (filename, data)},
                         headers={"Idempotency-Key": f"upload-{uuid.uuid4()}"})
        return cast(DatasetInfo, r.json())

    def upload_backbone(self, path: str | os.PathLike[str],
                        name: str | None = None) -> dict[str, Any]:
        """Upload encoder weights (``torch.save(model.encoder.state_dict(), path)``) for
        jobs to start from: pass the answer's ``id`` as ``backbone_id``."""
        p = Path(path)
        if not p.is_file():
            raise ClientError(f"{p}: no such file")
        r = self.request("POST", "/v1/backbones",
                         files={"file": (name or p.name, p.read_bytes())})
        return dict(r.json())

    def create_job(self, train: str | Mapping[str, Any], test: str | Mapping[str, Any],
                   **options: Any) -> JobInfo:
        """Queue a tuning job on two datasets (ids, or what :meth:`upload` returned).
        ``options`` are the job's fields (``n_trials``, ``search_space``, ``notify_url``,
        ...: see ``POST /v1/jobs`` in /docs); what is left out, the server's defaults
        decide."""
        body = {"train_dataset_id": _id(train), "test_dataset_id": _id(test), **options}
        r = self.request("POST", "/v1/jobs", json=body,
                         headers={"Idempotency-Key": f"job-{uuid.uuid4()}"})
        return cast(JobInfo, r.json())

    def wait(self, job_id: str, progress: Callable[[JobInfo], None] | None = None,
             timeout: float | None = None) -> JobInfo:
        """Follow the job until it ends (server-sent events; polling if the stream is
        unavailable), calling ``progress`` with the job each time it changes; returns the
        ended job, whatever its status. Raises TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.job(job_id)
        for job in self.follow(job_id):
            if progress is not None:
                progress(job)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
        return job

    def scores(self, job_id: str, *,
               format: Literal["numpy", "pandas", "records"] = "numpy",
               ensemble: int | None = None) -> Any:
        """The anomaly score of every test image, in test order (higher: more anomalous):
        a float64 numpy array; with ``format="pandas"`` a DataFrame (index, name, score;
        needs pandas); with ``format="records"`` a list of ``{"index", "name", "score"}``.
        ``ensemble=k``: the top-k configurations' mean z-score instead of the best's."""
        if format not in ("numpy", "pandas", "records"):
            raise ValueError(f"format={format!r}: one of 'numpy', 'pandas', 'records' "
                             "(the CSV body: request('GET', ..., params={'format': 'csv'}))")
        params: dict[str, Any] = {} if ensemble is None else {"ensemble": ensemble}
        rows = self.request("GET", f"/v1/jobs/{job_id}/scores", params=params).json()["scores"]
        if format == "records":
            return rows
        if format == "pandas":
            try:
                import pandas as pd
            except ImportError:
                raise ClientError("format='pandas' needs pandas: pip install pandas") from None
            return pd.DataFrame(rows, columns=["index", "name", "score"])
        return np.array([r["score"] for r in rows], dtype=np.float64)

    def threshold(self, job_id: str, rule: str | None = None) -> dict[str, Any]:
        """The label-free thresholds and the images above ``rule``'s (default: the
        suggested one)."""
        params = {} if rule is None else {"rule": rule}
        return dict(self.request("GET", f"/v1/jobs/{job_id}/threshold", params=params).json())

    @property
    def url(self) -> str:
        """The server this client talks to, without a trailing slash."""
        return str(self.http.base_url).rstrip("/")

    def report_url(self, job_id: str) -> str:
        """The job's report page, ready to open in a browser: with an API key, a signed
        link that expires (``POST /v1/jobs/{id}/report-link``); else the plain URL."""
        if self.api_key:
            return str(self.request("POST", f"/v1/jobs/{job_id}/report-link").json()["url"])
        return f"{self.url}/v1/jobs/{job_id}/report"

    def cancel(self, job_id: str) -> JobInfo:
        return cast(JobInfo, self.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def job(self, job_id: str) -> JobInfo:
        return cast(JobInfo, self.request("GET", f"/v1/jobs/{job_id}").json())

    def trials(self, job_id: str) -> list[dict[str, Any]]:
        """Every stored trial of the job (number, state, augmentation, params, losses, ...)."""
        return list(self.request("GET", f"/v1/jobs/{job_id}/trials").json()["trials"])

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's history: every status change with its attempt and message."""
        return list(self.request("GET", f"/v1/jobs/{job_id}/events").json()["events"])

    def follow(self, job_id: str, poll_seconds: float = 2.0) -> Iterator[JobInfo]:
        """The job each time it changes, until it ends: server-sent events, reconnecting
        when the stream drops, and polling if the server cannot stream."""
        while True:
            try:
                with connect_sse(self.http, "GET", f"/v1/jobs/{job_id}/stream",
                                 timeout=httpx.Timeout(30.0, read=60.0)) as source:
                    if source.response.status_code != 200:
                        source.response.read()
                        raise ClientError(_detail(source.response))
                    for sse in source.iter_sse():
                        if sse.event == "progress":
                            job = json.loads(sse.data)
                            yield job
                            if job["status"] in TERMINAL:
                                return
                        elif sse.event == "end":
                            return
            except (httpx.TransportError, httpx.HTTPStatusError):  # SSEError is one too
                pass  # the stream dropped (server restarting?): pick up the state again
            job = self.job(job_id)
            yield job
            if job["status"] in TERMINAL:
                return
            time.sleep(poll_seconds)


def _id(dataset: str | Mapping[str, Any]) -> str:
    return dataset if isinstance(dataset, str) else str(dataset["id"])


def _encode(source: Source, name: str | None) -> tuple[str, bytes]:
    """(file name, bytes) to upload: a file as it is, a folder as a zip of its images
    (recursively, in sorted order, each named by its path in the folder), an array as .npy
    (never pickled)."""
    if isinstance(source, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(source), allow_pickle=False)
        return name or "images.npy", buf.getvalue()
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        other = [p for p in found if p.suffix.lower() in OTHER_IMAGE_SUFFIXES]
        if other:
            raise ClientError(
                f"{path}: {len(other)} image(s) the server cannot read ("
                + ", ".join(p.relative_to(path).as_posix() for p in other[:3])
                + (", ..." if len(other) > 3 else "")
                + "): only PNG and JPEG are accepted; convert them, or move them out")
        files = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise ClientError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # PNG/JPEG: compressed
            for f in files:
                zf.write(f, f.relative_to(path).as_posix())
        return name or f"{path.name or 'images'}.zip", buf.getvalue()
    if not path.is_file():
        raise ClientError(f"{path}: no such file or folder")
    return name or path.name, path.read_bytes()


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
        return f"{r.status_code} {body.get('error', '')}: {body.get('detail', r.text)}"
    except ValueError:
        return f"{r.status_code}: {r.text[:200]}"


def fmt_duration(seconds: float) -> str:
    whole = round(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def step_counts(job: dict[str, Any]) -> tuple[int, int] | None:
    """(training steps done, training steps in all) of a job whose server states its
    plan's steps (``progress.train_steps_planned``) or whose worker reports its running
    trial (``progress.current_trial``); None otherwise, and the bar counts trials. Between
    two trials a planned job still counts steps, so the bar never changes basis (a short
    screen trial is a small share of the steps and a whole one of the trials: the bar
    would jump back). A trial at its last step counts in full until it is stored (its
    number is not yet among the finished ones); after that only ``trials_completed`` counts
    it, so nothing is counted twice."""
    progress = job["progress"]
    current = progress.get("current_trial")
    if not current or not current.get("steps"):
        planned = progress.get("train_steps_planned")
        if not planned:
            return None
        return min(int(progress.get("train_steps_done") or 0), int(planned)), int(planned)
    steps = int(current["steps"])
    step = min(int(current["step"]), steps)
    stored = step >= steps and int(current.get("number", -1)) < int(progress["trials_completed"])
    in_trial = 0 if stored else step
    if progress.get("train_steps_planned"):  # servers that state the plan (trials differ in
        total = int(progress["train_steps_planned"])  # length under the staged strategy)
        return min(int(progress.get("train_steps_done") or 0) + in_trial, total), total
    total = int(progress["n_trials"]) * steps
    return min(int(progress["trials_completed"]) * steps + in_trial, total), total


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 trial``, ``2 trials``; ``1 family``, ``2 families`` (``nouns`` given)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def describe_plan(plan: dict[str, Any]) -> str:
    """The job's budget in words: trials, steps, and the families left out."""
    screen, refine = plan["screen"], plan["refine"]
    text = (f"budget: {plural(plan['budget_trial_equivalents'], 'full-length trial')} = "
            f"{plan['budget_train_steps']:,} training steps ({plan['strategy']}: ")
    if plan["strategy"] == "staged" and screen["trials"]:
        families = len(screen["families"])
        of = plural(families, "family", "families")
        what = (of if screen["trials"] == families else
                f"{plural(screen['trials'], 'configuration')} of {of}")
        text += (f"screen {what} × {screen['train_steps_each']} steps, "
                 f"then {plural(refine['trials'], 'trial')} × "
                 f"{refine['train_steps_each']} steps)")
    else:
        text += (f"{plural(screen['trials'] + refine['trials'], 'trial')} × "
                 f"{refine['train_steps_each']} steps)")
    if plan["skipped_families"]:
        text += (f"\nnote: the budget cannot try every family; never tried: "
                 f"{', '.join(plan['skipped_families'])} (raise --n-trials to include them)")
    return text


def gap_words(gap: float, unit: str | None) -> str:
    """``selection.family_gap`` in words: rank points (the selection rule's), or the
    objective's loss for jobs stored when the best was the lowest loss (before 2026-12-01,
    and 2026-12-02 to 03) and servers older than the unit."""
    if unit == "rank points":
        return f"{gap:g} rank point{'' if gap == 1 else 's'} behind"
    return f"{gap:.3g} behind in the objective's loss"


def describe_selection(sel: dict[str, Any], job: str = "JOB") -> str:
    """How decisive the choice was, in a line (``job``: the id its ensemble hint names)."""
    k = max(2, int(sel.get("top_k") or 3))  # the configurations the verdict compared
    parts = []
    if sel.get("runner_up_family") is not None and sel.get("family_gap") is not None:
        share = sel.get("family_gap_share")
        parts.append(f"runner-up family {sel['runner_up_family']} is "
                     f"{gap_words(sel['family_gap'], sel.get('family_gap_unit'))}"
                     + ("" if share is None else f" ({share:.0%} of the candidates' range)"))
    if sel.get("agreement_jaccard") is not None:
        parts.append(f"the top {sel['top_k']} configurations agree on "
                     f"{sel['agreement_jaccard']:.0%} of the images they flag")
    verdict = {"decisive": "\ntrust: decisive",
               "uncertain": "\ntrust: uncertain: the tuned detector may be no better than "
                            f"its runner-up; the top {k} configurations' ensemble hedges it "
                            f"(ssad-tune follow {job} --ensemble {k}, or GET /v1/jobs/{job}"
                            f"/scores?ensemble={k})"}.get(sel.get("trust") or "", "")
    return "selection: " + ("; ".join(parts) if parts else "one candidate only") + verdict


def trial_counts(job: dict[str, Any]) -> tuple[int, int]:
    """(trials finished, trials the job runs): the plan's trial count where the server
    states it (the staged strategy runs more, shorter trials than its budget's n_trials)."""
    progress = job["progress"]
    return (int(progress["trials_completed"]),
            int(progress.get("trials_planned") or progress["n_trials"]))


def eta_seconds(done: int, total: int, done_at_start: int, elapsed: float) -> float | None:
    """Time left at the rate seen so far (``done - done_at_start`` units in ``elapsed``
    seconds); None before anything was seen to progress."""
    ran = done - done_at_start
    if ran <= 0 or elapsed <= 0:
        return None
    return elapsed / ran * max(total - done, 0)


def _timestamp(value: Any) -> datetime | None:
    """A job's ISO 8601 time (UTC when it names no zone); None when absent or unreadable."""
    if not value:
        return None
    try:
        at = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def running_for(job: dict[str, Any]) -> float:
    """Seconds since the job started running (``started_at``, by this machine's clock;
    0 when it is not stated or is ahead of the clock)."""
    at = _timestamp(job.get("started_at"))
    return 0.0 if at is None else max(0.0, (datetime.now(UTC) - at).total_seconds())


def ran_for(job: dict[str, Any]) -> float | None:
    """How long an ended job ran, by the server's clock (``finished_at - started_at``);
    None when either is not stated."""
    started, finished = _timestamp(job.get("started_at")), _timestamp(job.get("finished_at"))
    if started is None or finished is None:
        return None
    return max(0.0, (finished - started).total_seconds())


class Progress:
    """One line, redrawn in place on a terminal (and every second, so elapsed time and the
    ETA move between events); a new line per change otherwise. With the running trial's
    step reported by the server, the bar and the ETA follow training steps; otherwise,
    finished trials."""

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic,
                 tick_seconds: float | None = 1.0) -> None:
        self.out, self.clock = out, clock
        self.tty = out.isatty()
        self.start: float | None = None
        self.done_at_start = 0
        self.steps_start: tuple[float, int] | None = None  # (clock, steps done) first seen
        self.seen = False  # a job line drawn yet (the first one running: attached late)
        self.last = ""
        self.job: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.tty and tick_seconds:
            self._ticker = threading.Thread(target=self._tick, args=(tick_seconds,),
                                            daemon=True)
            self._ticker.start()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self.job is not None:
                    self._draw(self.job)

    def line(self, job: dict[str, Any]) -> str:
        done, total = trial_counts(job)
        if job["status"] == "running" and self.start is None:
            # Attached to a job already running (``follow``): elapsed counts from its start.
            # The trial-rate ETA then counts every finished trial over that whole time.
            behind = running_for(job) if not self.seen else 0.0
            self.start = self.clock() - behind
            self.done_at_start = 0 if behind > 0 else done
        self.seen = True
        now = self.clock()
        elapsed = 0.0 if self.start is None else now - self.start
        if self.start is None and job["status"] not in ("queued", "running"):
            # Found already ended (``follow`` on a finished job): how long the job ran,
            # not how long this client watched it.
            elapsed = ran_for(job) or 0.0
        steps = step_counts(job) if job["status"] == "running" else None
        if steps is not None:
            # The rate is measured from the first training step seen, not from the claim:
            # the worker's start (data, model) is no step and would inflate the ETA.
            if self.steps_start is None and job["progress"].get("current_trial"):
                self.steps_start = (now, steps[0])
            fraction = steps[0] / steps[1]
            left = (None if self.steps_start is None else
                    eta_seconds(steps[0], steps[1], self.steps_start[1],
                                now - self.steps_start[0]))
        else:
            fraction = done / total if total else 0.0
            left = eta_seconds(done, total, self.done_at_start, elapsed)
        width = 20
        filled = int(width * fraction)
        bar = "#" * filled + "-" * (width - filled)
        best = job.get("best")
        best_s = (f"best {best['validation_loss']:.4f} ({best['augmentation']})"
                  if best else "best -")
        current = job["progress"].get("current_trial") if steps is not None else None
        trial_s = ""
        if current and current.get("steps"):
            loss = current.get("loss")
            trial_s = (f"trial {current['number']} step {current['step']}/{current['steps']}"
                       f" loss {'-' if loss is None else format(loss, '.4f')}  ")
        eta = (f"ETA {fmt_duration(left)}" if left is not None and job["status"] == "running"
               else "ETA -")
        return (f"[{bar}] {done}/{total} trials  {trial_s}{best_s}  {job['status']}  "
                f"elapsed {fmt_duration(elapsed)}  {eta}")

    def update(self, job: dict[str, Any]) -> None:
        with self._lock:
            self.job = job
            self._draw(job)

    def _draw(self, job: dict[str, Any]) -> None:
        text = self.line(job)
        if text == self.last:
            return
        self.last = text
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self.tty and self.last:
            self.out.write("\n")
            self.out.flush()
            self.last = ""  # a second finish writes nothing more


def why_it_ended(client: Client, job: dict[str, Any]) -> str:
    """The job's error, else its last event's message (a cancelled job has no error: its
    events say who ended it and when)."""
    if job.get("error"):
        return str(job["error"])
    events = client.events(job["id"])
    reason = next((e["message"] for e in reversed(events) if e.get("message")), None)
    if job["status"] == "cancelled" and job.get("cancel_requested"):
        reason = f"{reason or 'cancelled'} (a cancel was requested: POST /v1/jobs/{{id}}/cancel)"
    return reason or "no reason recorded"


def save_best_finished_trial(client: Client, job: dict[str, Any], out: Path,
                             stream: TextIO) -> bool:
    """For a job that ended without succeeding: write the scores of its best finished
    trial, if any, to ``out``, and say plainly what they are."""
    best = job.get("best")
    done, total = trial_counts(job)
    if not best:
        print(f"no trial finished ({done} of {total}): no scores to save", file=stream)
        return False
    n = best["trial_number"]
    body = client.request("GET", f"/v1/jobs/{job['id']}/trials/{n}/scores",
                          params={"format": "csv"}).content
    out.write_bytes(body)
    ended = {"cancelled": "was cancelled"}.get(job["status"], str(job["status"]))
    print(f"note: the job {ended} after {done} of {total} trials; {out} holds the "
          f"scores of the best trial that finished (trial {n}: {best['augmentation']} "
          f"{json.dumps(best['params'])}, validation loss {best['validation_loss']:.4f}), "
          "not of a completed study", file=stream)
    return True


def tune(train: Path, test: Path, out: Path, *, url: str | None, api_key: str | None,
         job_options: dict[str, Any], stream: TextIO = sys.stderr,
         backbone: Path | None = None, ensemble: int | None = None) -> int:
    """The whole round trip; returns the process exit code. ``ensemble=k``: the scores
    written are the top-k configurations' mean z-score instead of the best trial's."""
    for p in (train, test):
        if not p.exists():
            print(f"error: {p}: no such file or folder", file=sys.stderr)
            return 2

    def run(client: Client) -> int:
        options = dict(job_options)
        tr = client.upload(train)
        te = client.upload(test)
        print(f"uploaded {train.name}: {tr['n_samples']} images ({tr['id']}); "
              f"{test.name}: {te['n_samples']} images ({te['id']})", file=stream)
        if backbone is not None:
            bb = client.upload_backbone(backbone)
            options["backbone_id"] = bb["id"]
            print(f"uploaded backbone {backbone.name} ({bb['id']})", file=stream)
        created: dict[str, Any] = dict(client.create_job(tr, te, **options))
        job_id = created["id"]
        print(f"job {job_id} queued: {client.url}/v1/jobs/{job_id}", file=stream)
        if created.get("plan"):
            print(describe_plan(created["plan"]), file=stream)
        return follow_job(client, created, out, stream=stream, ensemble=ensemble)

    return run_command(Client(url, api_key), run)


def run_command(client: Client, command: Callable[[Client], int]) -> int:
    """A command's body against ``client``: a ClientError is printed as the error and is
    exit code 1; the client is closed either way."""
    try:
        return command(client)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def follow_job(client: Client, job: dict[str, Any], out: Path, *,
               stream: TextIO = sys.stderr, ensemble: int | None = None) -> int:
    """Follow a job until it ends, with the progress bar, then write its scores CSV to
    ``out`` (a job that ended otherwise: its best finished trial's, said plainly); returns
    the exit code. ``tune`` ends with it, and ``ssad-tune follow JOB`` starts with it, to
    reattach to a job after Ctrl-C or from another shell."""
    job_id = job["id"]
    bar = Progress(stream)
    try:
        for update in client.follow(job_id):
            job = dict(update)
            bar.update(job)
    except KeyboardInterrupt:
        bar.finish()
        again = " ".join(["ssad-tune follow", job_id,
                          *(["--url", client.url]
                            if client.url != default_url().rstrip("/") else []),
                          *(["-o", str(out)] if str(out) != "scores.csv" else []),
                          *(["--ensemble", str(ensemble)] if ensemble else [])])
        print(f"\nstopped following; job {job_id} goes on on the server (follow it again: "
              f"{again}; cancel it: POST {client.url}/v1/jobs/{job_id}/cancel)",
              file=sys.stderr)
        return 130
    finally:  # also when following fails: the line ends and the ticker stops
        bar.finish()
    if job["status"] != "succeeded":
        print(f"job {job['status']}: {why_it_ended(client, job)}", file=sys.stderr)
        save_best_finished_trial(client, job, out, stream)
        return 1
    params: dict[str, Any] = {"format": "csv"}
    if ensemble is not None:
        params["ensemble"] = ensemble
    body = client.request("GET", f"/v1/jobs/{job_id}/scores", params=params).content
    out.write_bytes(body)
    best = job["best"]
    print(f"best: {best['augmentation']} {json.dumps(best['params'])} "
          f"(validation loss {best['validation_loss']:.4f}, trial {best['trial_number']})",
          file=stream)
    if job.get("selection"):
        print(describe_selection(job["selection"], job_id), file=stream)
    if ensemble is None:
        thr = client.request("GET", f"/v1/jobs/{job_id}/threshold").json()
        rule = next(r for r in thr["rules"] if r["rule"] == thr["rule"])
        n_test = sum(1 for _ in csv.reader(io.StringIO(body.decode()))) - 1  # the header
        print(f"suggested threshold ({rule['rule']}): {rule['threshold']:.4g}, flags "
              f"{rule['n_flagged']} of {n_test} test images", file=stream)
        print(f"scores written to {out}", file=stream)
    else:  # the suggested threshold is set on the best trial's scores, not on z-scores
        print(f"scores written to {out}: the mean z-score of the top {ensemble} "
              "full-length configurations, or of as many as finished (no suggested "
              "threshold: it is set on the best trial's scores)", file=stream)
    return 0


def follow(job_id: str, out: Path, *, url: str | None, api_key: str | None,
           stream: TextIO = sys.stderr, ensemble: int | None = None) -> int:
    """``ssad-tune follow JOB``: the end of ``tune`` for a job that already exists."""
    def run(client: Client) -> int:
        job: dict[str, Any] = dict(client.job(job_id))
        done, total = trial_counts(job)
        print(f"job {job_id} {job['status']}: {done} of {total} trials finished", file=stream)
        return follow_job(client, job, out, stream=stream, ensemble=ensemble)

    return run_command(Client(url, api_key), run)
