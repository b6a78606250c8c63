"""Tune on folders of images laid out as MVTec AD is, with the Python client library.

    pip install ssad-tune-*.whl            # the client alone: no torch, no server
    python examples/tune_folder.py DATA/train/good DATA/test/mixed [--n-trials 12]

Uploads both folders (every PNG/JPEG in them, named by its path in the folder), tunes,
prints the progress, the chosen augmentation and how decisive the choice was, the report
page's URL (a signed link when the server needs a key), the suggested label-free threshold
and the images above it, and writes every score to a CSV. The server: $SSAD_URL (else
http://127.0.0.1:8000); the key, if it needs one: $SSAD_API_KEY.

Try it on the bundled digits: python examples/make_digits.py /tmp/digits --folders, then
python examples/tune_folder.py /tmp/digits/train/good /tmp/digits/test/mixed.
"""

from __future__ import annotations

import argparse
import csv
import sys

from ssad_tune import Client, ClientError, JobInfo, describe_selection


def show(job: JobInfo) -> None:
    p = job["progress"]
    best = job.get("best")
    print(f"  {job['status']}: {p['trials_completed']}/{p.get('trials_planned') or p['n_trials']}"
          f" trials" + (f", best so far {best['augmentation']} ({best['validation_loss']:.4f})"
                        if best else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train", help="folder of normal images (e.g. DATA/train/good)")
    ap.add_argument("test", help="folder of images to score (e.g. DATA/test/mixed)")
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--url", default=None)
    ap.add_argument("--out", default="scores.csv")
    args = ap.parse_args(argv)
    options = {"n_trials": args.n_trials}
    if args.train_steps:
        options["train_steps"] = args.train_steps
    try:
        with Client(args.url) as c:
            train, test = c.upload(args.train), c.upload(args.test)
            print(f"uploaded {train['n_samples']} train and {test['n_samples']} test images")
            job = c.create_job(train, test, **options)
            print(f"job {job['id']} queued; report: {c.report_url(job['id'])}")
            seen: set[int] = set()

            def progress(j: JobInfo) -> None:  # one line per finished trial
                done = j["progress"]["trials_completed"]
                if done not in seen or j["status"] != "running":
                    seen.add(done)
                    show(j)

            job = c.wait(job["id"], progress=progress)
            if job["status"] != "succeeded":
                print(f"job {job['status']}: {job.get('error') or 'see its events'}",
                      file=sys.stderr)
                return 1
            best, sel = job["best"] or {}, job.get("selection") or {}
            print(f"chosen: {best['augmentation']} {best['params']} "
                  f"(validation loss {best['validation_loss']:.4f})")
            if sel:
                print(describe_selection(sel, job["id"]))  # how decisive the choice was
            print(f"report: {c.report_url(job['id'])}")
            thr = c.threshold(job["id"])
            rule = next(r for r in thr["rules"] if r["rule"] == thr["rule"])
            print(f"threshold ({rule['rule']}): {rule['threshold']:.4g} flags "
                  f"{rule['n_flagged']} of {test['n_samples']} images:")
            for f in thr["flagged"][:20]:
                print(f"  {f['name']}  {f['score']:.4g}")
            rows = c.scores(job["id"], format="records")  # or numpy (default), pandas
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "score", "flagged"])
        w.writerows((r["name"], f"{r['score']:.6g}", int(r["score"] > rule["threshold"]))
                    for r in rows)
    print(f"scores written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
