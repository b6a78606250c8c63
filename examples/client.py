"""A Python client for ssad-tune, with httpx: upload, tune, follow, read the results, score
new images with the best trial's detector.

    python examples/client.py TRAIN TEST [NEW]

The server: $SSAD_URL, else http://$SSAD_HOST:$SSAD_PORT (what `ssad-tune serve` listens on),
else http://127.0.0.1:8000. The API key, if the server needs one: $SSAD_API_KEY.

Try it on the bundled digits: python examples/make_digits.py && python examples/client.py \
    examples/data/digits_train.npz examples/data/digits_test.npz examples/data/digits_test.npz
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import httpx

N_TRIALS = int(os.environ.get("N_TRIALS", "12"))
TRAIN_STEPS = int(os.environ.get("TRAIN_STEPS", "400"))


def server_url() -> str:
    if os.environ.get("SSAD_URL"):
        return os.environ["SSAD_URL"]
    host = os.environ.get("SSAD_HOST") or "127.0.0.1"
    host = "127.0.0.1" if host == "0.0.0.0" else host  # a wildcard bind: this machine
    return f"http://{host}:{os.environ.get('SSAD_PORT') or 8000}"


def follow(c: httpx.Client, job_id: str) -> dict:
    """Print the job's progress from its server-sent events until it ends."""
    job: dict = {}
    with c.stream("GET", f"/v1/jobs/{job_id}/stream", timeout=None) as r:
        r.raise_for_status()
        event = ""
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "progress":
                job = json.loads(line[5:])
                planned = job["progress"]["trials_planned"]
                if planned is None:  # a scoring job: no study, no trials
                    print(f"  {job['status']}")
                    continue
                best = job["best"]["validation_loss"] if job["best"] else "-"
                print(f"  {job['status']}: {job['progress']['trials_completed']}/"
                      f"{planned} trials, best loss {best}")
    return job


def names(flagged: list[dict], shown: int = 10) -> str:
    """The first ``shown`` flagged images' names, and how many more there are."""
    head = ", ".join(f["name"] for f in flagged[:shown])
    return head + (f" and {len(flagged) - shown} more" if len(flagged) > shown else "")


def main(train: str, test: str, new: str | None = None) -> int:
    key = os.environ.get("SSAD_API_KEY")
    url = server_url()
    c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {},
                     timeout=300)
    try:
        c.get("/healthz").raise_for_status()
    except httpx.HTTPError as exc:
        print(f"cannot reach the server at {url} ({exc}): is it running? Point this "
              "script at it with SSAD_URL=URL (or SSAD_HOST and SSAD_PORT)", file=sys.stderr)
        return 1

    def upload(path: str) -> str:
        # An Idempotency-Key makes retrying this request safe: no duplicate dataset.
        r = c.post("/v1/datasets", files={"file": (Path(path).name, Path(path).read_bytes())},
                   headers={"Idempotency-Key": str(uuid.uuid4())})
        r.raise_for_status()
        return str(r.json()["id"])

    train_id, test_id = upload(train), upload(test)
    r = c.post("/v1/jobs", json={"train_dataset_id": train_id, "test_dataset_id": test_id,
                                 "n_trials": N_TRIALS, "train_steps": TRAIN_STEPS},
               headers={"Idempotency-Key": str(uuid.uuid4())})
    r.raise_for_status()
    job_id, plan = r.json()["id"], r.json()["plan"]
    refine = plan["refine"]["trials"]
    print(f"job {job_id}: {plan['screen']['trials']} families screened, then "
          f"{refine} full-length trial{'' if refine == 1 else 's'}")
    if plan["skipped_families"]:  # the budget (n_trials) is too small to try them all
        print(f"  never tried: {', '.join(plan['skipped_families'])}")
    job = follow(c, job_id)
    if job["status"] != "succeeded":  # why: its error, and its last event
        last = c.get(f"/v1/jobs/{job_id}/events").json()["events"][-1]["message"]
        print(f"job {job['status']}: {job['error'] or ''} (last event: {last})",
              file=sys.stderr)
        return 1
    print("best:", job["best"])

    threshold = c.get(f"/v1/jobs/{job_id}/threshold").json()
    print(f"flagged by the {threshold['rule']} rule ({len(threshold['flagged'])}):",
          names(threshold["flagged"]))
    Path("top.png").write_bytes(c.get(f"/v1/jobs/{job_id}/plots/top.png").content)
    Path("scores.csv").write_text(c.get(f"/v1/jobs/{job_id}/scores",
                                        params={"format": "csv"}).text)
    print("wrote scores.csv and top.png")

    if new:  # score more images later with the same detector
        r = c.post(f"/v1/jobs/{job_id}/score", json={"dataset_id": upload(new)})
        r.raise_for_status()
        scored = follow(c, r.json()["id"])
        scores = c.get(f"/v1/jobs/{scored['id']}/scores").json()["scores"]
        print(f"scored {len(scores)} new images; highest:",
              max(scores, key=lambda s: s["score"]))
        # Judged against the tuning job's threshold (its test set is the reference), so
        # even a handful of new images is flagged when it stands out.
        judged = c.get(f"/v1/jobs/{scored['id']}/threshold").json()
        print(f"flagged against job {judged['reference_job_id']}'s threshold "
              f"({len(judged['flagged'])}):", names(judged["flagged"]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
