"""The Kubernetes manifests (deploy/k8s) are valid against the API schemas of a recent
Kubernetes, strictly (an unknown or misspelt field fails), and say what docs/deploy.md
promises: the database URL from a Secret, the API ready on /readyz, one GPU per worker,
workers scaled on the queue's slot metric, a graceful stop long enough to give a trial
back. Offline: kubernetes-validate carries the schemas."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
VERSION = "1.31.0"


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_there_are_manifests() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in documents()}
    assert kinds >= {("Secret", "ssad-database"), ("Job", "ssad-migrate"),
                     ("Deployment", "ssad-api"), ("Service", "ssad-api"),
                     ("Deployment", "ssad-worker"),
                     ("HorizontalPodAutoscaler", "ssad-worker")}


@pytest.mark.parametrize("name,doc", documents(),
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_each_manifest_is_valid_strictly(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_an_invalid_manifest_is_refused() -> None:
    """The validator does fail: a misspelt field of the worker's container."""
    doc = by_kind("Deployment", "ssad-worker")
    doc["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def _pod(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(kind, name)["spec"]["template"]["spec"]
    return spec


def test_what_the_deployment_guide_promises() -> None:
    for kind, name in (("Deployment", "ssad-api"), ("Deployment", "ssad-worker"),
                       ("Job", "ssad-migrate")):
        container = _pod(kind, name)["containers"][0]
        assert {"secretRef": {"name": "ssad-database"}} in container["envFrom"], name
    api = _pod("Deployment", "ssad-api")["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    worker = _pod("Deployment", "ssad-worker")
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["value"] for e in worker["containers"][0]["env"]}
    # The grace period outlasts a lease: a stopping worker gives its trial back in time.
    assert worker["terminationGracePeriodSeconds"] > float(env["SSAD_LEASE_SECONDS"])
    hpa = by_kind("HorizontalPodAutoscaler", "ssad-worker")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "ssad-worker"
    assert hpa["metrics"][0]["external"]["metric"]["name"] == "ssad_trial_slots_wanted"
    assert _pod("Job", "ssad-migrate")["containers"][0]["command"] == ["alembic", "upgrade",
                                                                       "head"]



def test_pods_can_start_and_releases_keep_the_autoscaled_count() -> None:
    """runAsNonRoot can only be checked against a numeric USER (a named one is refused at
    start: CreateContainerConfigError); the worker count belongs to the autoscaler, so the
    Deployment states none (an apply would reset it); one API process per pod, so each
    process's counters are one scrape target."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and all(u.isdigit() and u != "0" for u in users), users
    for name in ("ssad-api", "ssad-worker"):
        pod = by_kind("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
    hpa = by_kind("HorizontalPodAutoscaler", "ssad-worker")["spec"]["scaleTargetRef"]
    assert "replicas" not in by_kind("Deployment", hpa["name"])["spec"]
    api = by_kind("Deployment", "ssad-api")["spec"]["template"]["spec"]["containers"][0]
    assert "--workers" not in api["command"]
