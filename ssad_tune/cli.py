"""``ssad-tune``: one command for users and operators.

    ssad-tune tune TRAIN TEST [-o scores.csv]   upload, tune, follow, save the scores
                                            (server: --url, SSAD_URL or SSAD_HOST/SSAD_PORT;
                                            key: SSAD_API_KEY; TRAIN/TEST: a file or a
                                            folder of images)
    ssad-tune follow JOB_ID [-o scores.csv] follow a job that exists, then save its scores
    ssad-tune report JOB_ID                 the job's report page (a signed link with a key)
    ssad-tune serve                         the API (+ embedded worker on SQLite)
    ssad-tune worker [--device cuda:0]      one worker (--concurrency N: N processes)
    ssad-tune migrate                       alembic upgrade head on SSAD_DATABASE_URL
    ssad-tune keys create --tenant NAME     a new API key (printed once; stored hashed)
    ssad-tune keys list | keys revoke ID
    ssad-tune tenants list | tenants quota NAME [--active-jobs N] [--stored-bytes B]
                                            [--trials-per-job T] [--compute-per-job C]
                                            (-1: back to default)

Every command but ``tune``, ``follow`` and ``report`` reads the database from
SSAD_DATABASE_URL (default: ./ssad.db) and needs the server's packages (``pip install
'ssad-tune[server]'``; ``worker`` needs ``ssad-tune[worker]``); ``tune``, ``follow`` and
``report`` need only the plain wheel.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the operator commands import the server's modules only when they run
    from sqlalchemy.orm import Session

    from service.settings import ApiSettings


@contextmanager
def _session(settings: ApiSettings) -> Iterator[Session]:
    from ssad_common.db import make_engine, session_scope

    engine = make_engine(settings.database_url)
    try:
        with session_scope(engine) as s:
            yield s
    finally:
        engine.dispose()


def _keys_create(args: argparse.Namespace, settings: ApiSettings) -> int:
    from service import tenants

    with _session(settings) as s:
        key, plain = tenants.create_key(s, args.tenant)
        key_id = key.id
    print(plain)
    print(f"key {key_id} for tenant {args.tenant!r}: shown once, store it now; "
          f"revoke with `ssad-tune keys revoke {key_id[:8]}`", file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace, settings: ApiSettings) -> int:
    from service import tenants

    with _session(settings) as s:
        for key, tenant in tenants.list_keys(s):
            state = "revoked " + key.revoked_at.isoformat() if key.revoked_at else "active"
            print(f"{key.id}  {key.prefix}…  tenant={tenant}  "
                  f"created={key.created_at.isoformat()}  {state}")
    return 0


def _keys_revoke(args: argparse.Namespace, settings: ApiSettings) -> int:
    from service import tenants

    with _session(settings) as s:
        key = tenants.revoke_key(s, args.key_id)
        print(f"key {key.id} revoked")
    return 0


def _tenants_list(args: argparse.Namespace, settings: ApiSettings) -> int:
    from service import tenants

    def show(v: int | None, default: int) -> str:
        return f"{default} (default)" if v is None else str(v)

    with _session(settings) as s:
        for t in tenants.list_tenants(s):
            print(f"{t.name}  id={t.id}"
                  f"  active_jobs={show(t.max_active_jobs, settings.max_active_jobs)}"
                  f"  stored_bytes={show(t.max_stored_bytes, settings.max_stored_bytes)}"
                  f"  trials_per_job={show(t.max_trials_per_job, settings.max_trials_per_job)}"
                  f"  compute_per_job="
                  f"{show(t.max_compute_per_job, settings.max_compute_per_job)}")
    return 0


def _tenants_quota(args: argparse.Namespace, settings: ApiSettings) -> int:
    from service import tenants

    with _session(settings) as s:
        tenants.set_quotas(s, args.name, max_active_jobs=args.active_jobs,
                           max_stored_bytes=args.stored_bytes,
                           max_trials_per_job=args.trials_per_job,
                           max_compute_per_job=args.compute_per_job)
    return _tenants_list(args, settings)


def _migrate(args: argparse.Namespace, settings: ApiSettings) -> int:
    from service import migrate

    migrate.upgrade_head(settings.database_url)
    print("database at", migrate.head_revision())
    return 0


def _serve(args: argparse.Namespace, settings: ApiSettings) -> int:
    from service.__main__ import main as serve

    return serve([])


def _tune(args: argparse.Namespace) -> int:
    from ssad_tune import client

    options: dict[str, object] = {}  # what is not given, the server's job defaults decide
    for name in ("n_trials", "strategy", "objective", "train_steps", "contamination", "seed",
                 "batch_size", "parallelism"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    space: dict[str, object] = {}
    if args.augmentations:
        space["augmentations"] = args.augmentations.split(",")
    if args.patch_size:
        space["patch_size"] = args.patch_size
    if space:
        options["search_space"] = space
    if args.detector:
        options["detector"] = args.detector
    return client.tune(Path(args.train), Path(args.test), Path(args.out), url=args.url,
                       api_key=os.environ.get("SSAD_API_KEY"), job_options=options,
                       backbone=Path(args.backbone) if args.backbone else None,
                       ensemble=args.ensemble)


def _positive(text: str) -> int:
    """A count the server would refuse below 1, refused here before anything is uploaded."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be at least 1")
    return n


def _follow(args: argparse.Namespace) -> int:
    from ssad_tune import client

    return client.follow(args.job_id, Path(args.out), url=args.url,
                         api_key=os.environ.get("SSAD_API_KEY"), ensemble=args.ensemble)


def _ensemble_option(p: argparse.ArgumentParser) -> None:
    # The server's bounds (ssad_common.ensemble.MIN_K, MAX_K), checked here before anything
    # is uploaded; the client wheel does not ship ssad_common.
    p.add_argument("--ensemble", type=int, choices=range(2, 11), metavar="K",
                   help="write the mean z-score of the top K full-length configurations "
                        "(2-10) instead of the best's: the hedge for when the trust line "
                        "says uncertain")


def _report(args: argparse.Namespace) -> int:
    from ssad_tune.client import Client, ClientError

    try:
        with Client(args.url) as c:
            print(c.report_url(args.job_id))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ssad-tune", description=(__doc__ or "").replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tune", help="tune on a server: upload TRAIN and TEST, follow the "
                                    "job, write the scores CSV")
    t.add_argument("train", help=".npz, .npy, .zip of PNG/JPEG or a folder of them "
                   "(unlabeled, mostly normal)")
    t.add_argument("test", help="the images to score (unlabeled)")
    t.add_argument("-o", "--out", default="scores.csv",
                   help="scores CSV (index,name,score; default: scores.csv in the current "
                        "directory, replaced if it exists)")
    t.add_argument("--url", default=None,
                   help="server (default: $SSAD_URL, else http://$SSAD_HOST:$SSAD_PORT as "
                        "`serve` uses them, else http://127.0.0.1:8000)")
    t.add_argument("--n-trials", type=_positive, help="the study's budget in full-length trials "
                   "(default: the server's job default, 12)")
    t.add_argument("--strategy", choices=("staged", "tpe"),
                   help="how the budget is spent (default: the server's, staged: a short "
                        "screen of every family, then full-length trials over the leaders)")
    t.add_argument("--parallelism", type=_positive,
                   help="trials run at once, each on its own worker (default: the server's, "
                        "SSAD_DEFAULT_PARALLELISM)")
    t.add_argument("--augmentations", help="comma-separated families (default: the server's)")
    t.add_argument("--patch-size", type=float, nargs=2, metavar=("MIN", "MAX"))
    t.add_argument("--objective")
    t.add_argument("--train-steps", type=_positive)
    t.add_argument("--batch-size", type=_positive)
    t.add_argument("--contamination", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--detector", choices=("small", "resnet18"))
    _ensemble_option(t)
    t.add_argument("--backbone", metavar="FILE",
                   help="start every trial from these encoder weights (torch.save(model."
                        "encoder.state_dict(), FILE), for the job's detector and size)")
    t.set_defaults(fn=_tune, operator=False)
    f = sub.add_parser("follow", help="follow a job that already exists (after Ctrl-C in "
                                      "tune, or from another shell) and write its scores "
                                      "CSV, as tune does")
    f.add_argument("job_id")
    f.add_argument("-o", "--out", default="scores.csv",
                   help="scores CSV (as for tune: default scores.csv, replaced if it exists)")
    f.add_argument("--url", default=None, help="server (as for tune)")
    _ensemble_option(f)
    f.set_defaults(fn=_follow, operator=False)
    rep = sub.add_parser("report", help="print the URL of a job's report page (with "
                                        "SSAD_API_KEY set: a signed link a browser can open)")
    rep.add_argument("job_id")
    rep.add_argument("--url", default=None, help="server (as for tune)")
    rep.set_defaults(fn=_report, operator=False)
    sub.add_parser("serve", help="run the API (settings: SSAD_* variables, see the README)"
                   ).set_defaults(fn=_serve)
    # Listed for --help only: main() hands `worker ...` to the worker's own parser.
    sub.add_parser("worker", help="run one worker, or N with --concurrency N (options: "
                                  "ssad-tune worker --help)")
    sub.add_parser("migrate", help="upgrade the database schema").set_defaults(fn=_migrate)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    c = keys.add_parser("create", help="create a key (and the tenant if new)")
    c.add_argument("--tenant", required=True)
    c.set_defaults(fn=_keys_create)
    keys.add_parser("list", help="list keys (never the keys themselves)").set_defaults(
        fn=_keys_list)
    r = keys.add_parser("revoke", help="revoke a key by id (or its first 8+ characters)")
    r.add_argument("key_id")
    r.set_defaults(fn=_keys_revoke)

    ten = sub.add_parser("tenants", help="tenants and quotas").add_subparsers(
        dest="action", required=True)
    ten.add_parser("list", help="tenants and their quotas").set_defaults(fn=_tenants_list)
    q = ten.add_parser("quota", help="set a tenant's quotas (-1: back to the default)")
    q.add_argument("name")
    q.add_argument("--active-jobs", type=int)
    q.add_argument("--stored-bytes", type=int)
    q.add_argument("--trials-per-job", type=int)
    q.add_argument("--compute-per-job", type=int,
                   help="training images per job: n_trials x train_steps x batch_size x "
                        "the detector's cost per image (1 for the small detector)")
    q.set_defaults(fn=_tenants_quota)
    return ap


#: Packages of the extras: a command that fails to import one was installed without them.
EXTRAS = {"fastapi": "server", "sqlalchemy": "server", "alembic": "server",
          "uvicorn": "server", "pydantic": "server", "pydantic_settings": "server",
          "optuna": "server", "torch": "worker", "kornia": "worker", "sklearn": "worker"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["worker"]:  # every option, --help included, is the worker's own
            from worker.__main__ import main as worker

            return worker(argv[1:])
        args = parser().parse_args(argv)
        if not getattr(args, "operator", True):
            client_command: Callable[[argparse.Namespace], int] = args.fn
            return client_command(args)
        return _operator(args.fn, args)
    except KeyboardInterrupt:  # uploads, downloads: stopped by the user, no traceback
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: `ssad-tune {argv[0]}` needs the {extra}'s packages ({exc.name} is "
              f"missing): pip install 'ssad-tune[{extra}]'", file=sys.stderr)
        return 2


def _operator(fn: Callable[[argparse.Namespace, ApiSettings], int],
              args: argparse.Namespace) -> int:
    """An operator command: against the database, with the API's settings."""
    from service.errors import AppError
    from service.settings import ApiSettings

    try:
        return fn(args, ApiSettings())
    except AppError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
