"""deploy/k8s built by kubectl's own kustomize (a child process) is what tests/unit/test_k8s_manifests.py checks.

The unit test validates the objects its small builder makes from each kustomization; here `kubectl kustomize`
must make the same objects, so the checks hold for what `kubectl apply -k` sends. Skipped without kubectl.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.unit.test_k8s_manifests import BUILDS, build

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.mark.parametrize("name", BUILDS)
def test_kubectl_kustomize_builds_the_same(name: str):
    out = subprocess.run(["kubectl", "kustomize", str(BUILDS[name])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    built_by_kubectl = [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]
    assert sorted(built_by_kubectl, key=key) == sorted(build(BUILDS[name]), key=key)
