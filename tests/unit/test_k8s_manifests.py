"""deploy/k8s: the Kubernetes manifests, validated offline and held to what `mpserve up` and compose run.

Every Kubernetes object under deploy/k8s is checked against the Kubernetes 1.30 OpenAPI schemas (strict: an
unknown field fails) with the `kubernetes-validate` package. The kustomizations are built here by a small
builder (resources, JSON 6902 patches with a target, `$patch: delete`, `images`), and the built objects are
validated too and held to `mpserve.stack.process_specs`, the source of truth docker-compose.yml is held to
(tests/processes/test_stack.py). tests/processes/test_k8s_kustomize.py checks that kubectl's own kustomize builds
the same. No cluster is involved.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mpserve.stack import StackSettings, process_specs
from server.settings import ServerSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"
BUILDS = {"base": K8S / "base", "external-redis": K8S / "overlays" / "external-redis",
          "gpu": K8S / "overlays" / "gpu"}
SECRET_TEMPLATE = K8S / "base" / "secret.example.yaml"
WORKLOADS = ("Deployment", "StatefulSet")
# what the manifests add to process_specs' environment, per process and build (all of them from the Secret or the
# overlay; the names are still checked against the settings classes below)
EXTRA_ENV = {"api": {"MPSERVE_API_KEYS"}, "worker": set()}
OVERLAY_ENV = {"base": set(), "external-redis": set(), "gpu": {"MPSERVE_DEVICE"}}
CONTAINERS = {"api": ("mpserve-api", "api"), "worker": ("mpserve-worker", "worker")}
SETTINGS = {"api": ServerSettings, "worker": WorkerSettings}


def yaml_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))


def load_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def is_kustomization(path: Path) -> bool:
    return path.name == "kustomization.yaml"


def env_name(name: str) -> str:
    return f"MPSERVE_{name.upper()}"


# ---------------------------------------------------------------------------------------------------- the builder


def unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_json_patch(obj: dict, ops: list[dict], where: str) -> None:
    """RFC 6902 add / replace / remove / test, enough for the overlays (a failed `test` fails the test)."""
    for op in ops:
        *parents, last = [unescape(t) for t in op["path"].split("/")[1:]]
        node = obj
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        kind = op["op"]
        if kind == "test":
            current = node[int(last)] if isinstance(node, list) else node[last]
            assert current == op["value"], f"{where}: test {op['path']} == {op['value']!r} fails: {current!r}"
        elif kind == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if isinstance(node, list):
                assert 0 <= int(last) < len(node), f"{where}: replace {op['path']}: no such item"
                node[int(last)] = copy.deepcopy(op["value"])
            else:
                assert last in node, f"{where}: replace {op['path']}: no such field"
                node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            pytest.fail(f"{where}: unsupported JSON patch op {kind!r}")


def matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return (obj["kind"] == target.get("kind", obj["kind"]) and obj["metadata"]["name"] == target.get("name", obj[
        "metadata"]["name"]) and group == target.get("group", group) and version == target.get("version", version))


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def build(directory: Path) -> list[dict]:
    """What `kubectl apply -k directory` would send, for the features these kustomizations use."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objs: list[dict] = []
    for res in kust.get("resources", []):
        path = directory / res
        objs += build(path) if path.is_dir() else copy.deepcopy(load_docs(path))
    for patch in kust.get("patches", []):
        path = directory / patch["path"]
        for doc in load_docs(path):
            if isinstance(doc, list):  # JSON 6902: one target
                targets = [o for o in objs if matches(o, patch["target"])]
                assert len(targets) == 1, f"{path}: target {patch.get('target')} matches {len(targets)} objects"
                apply_json_patch(targets[0], doc, str(path))
            elif doc.get("$patch") == "delete":
                gone = [o for o in objs if o["kind"] == doc["kind"] and o["apiVersion"] == doc["apiVersion"]
                        and o["metadata"]["name"] == doc["metadata"]["name"]]
                assert len(gone) == 1, f"{path}: deletes {doc['kind']}/{doc['metadata']['name']}, not in the base"
                objs.remove(gone[0])
            else:
                pytest.fail(f"{path}: only JSON 6902 patches and $patch: delete are supported here")
    for image in kust.get("images", []):
        for obj in objs:
            if obj["kind"] in WORKLOADS:
                for c in pod_spec(obj)["containers"]:
                    name, _, tag = c["image"].partition(":")
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return objs


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {name: build(directory) for name, directory in BUILDS.items()}


def find(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(objs: list[dict], process: str) -> dict:
    deployment, name = CONTAINERS[process]
    containers = pod_spec(find(objs, "Deployment", deployment))["containers"]
    assert [c["name"] for c in containers] == [name]
    return containers[0]


def env_of(c: dict) -> dict[str, dict]:
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"{c['name']}: a variable set twice: {names}"
    return {e["name"]: e for e in c.get("env", [])}


def secret_template() -> dict:
    (secret,) = load_docs(SECRET_TEMPLATE)
    return secret


# ------------------------------------------------------------------------------------------- (1) schemas, layout


def test_the_layout_exists():
    assert set(BUILDS) and all((d / "kustomization.yaml").is_file() for d in BUILDS.values())
    assert SECRET_TEMPLATE.is_file()
    assert len(yaml_files()) >= 10


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_document_is_valid(path: Path, built):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    if is_kustomization(path):  # not a Kubernetes object: what it lists must exist
        (kust,) = docs
        assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
        assert "namespace" not in kust
        listed = kust.get("resources", []) + [p["path"] for p in kust.get("patches", [])]
        assert listed
        for entry in listed:
            target = path.parent / entry
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {entry} does not exist"
        return
    base = built["base"]
    for doc in docs:
        if isinstance(doc, list):  # a JSON 6902 patch: checked by building it (test_every_build_is_valid)
            assert doc and all(op["op"] in ("add", "replace", "remove", "test") and op["path"].startswith("/")
                               for op in doc), path
        elif doc.get("$patch") == "delete":
            assert set(doc) == {"$patch", "apiVersion", "kind", "metadata"} and set(doc["metadata"]) == {"name"}
            find(base, doc["kind"], doc["metadata"]["name"])
        else:
            assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            assert "namespace" not in doc["metadata"], f"{path}: a hardcoded namespace"


@pytest.mark.parametrize("name", BUILDS)
def test_every_build_is_valid(name: str, built):
    objs = built[name]
    assert objs
    for obj in objs:
        assert kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        assert "namespace" not in obj["metadata"], f"{obj['kind']}/{obj['metadata']['name']}: hardcoded namespace"
    ids = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(ids) == len(set(ids)), f"{name}: an object twice"


def test_the_validator_rejects_what_it_should(built):
    """The schema check is not vacuous: a misspelt field and a wrong type are refused."""
    deployment = copy.deepcopy(find(built["base"], "Deployment", "mpserve-api"))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(find(built["base"], "Deployment", "mpserve-api"))
    pod_spec(deployment)["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_file_is_used_and_the_secret_template_is_not_applied():
    listed = set()
    for kust_path in K8S.rglob("kustomization.yaml"):
        kust = yaml.safe_load(kust_path.read_text())
        for entry in kust.get("resources", []) + [p["path"] for p in kust.get("patches", [])]:
            listed.add((kust_path.parent / entry).resolve())
    unused = {p.resolve() for p in yaml_files() if not is_kustomization(p)} - listed
    # the placeholder Secret is never applied by `apply -k`: the operator creates the real one
    assert unused == {SECRET_TEMPLATE.resolve()}, f"files no kustomization uses: {sorted(map(str, unused))}"
    for value in secret_template()["stringData"].values():
        assert "CHANGE-ME" in value, "the Secret template holds placeholders only"


# ------------------------------------------------------------------------ (2) the environment of process_specs


@pytest.mark.parametrize("name", BUILDS)
def test_api_and_worker_run_what_mpserve_up_runs(name: str, built):
    objs = built[name]
    specs = process_specs(StackSettings(_env_file=None), "redis://redis:6379/0", "token")
    assert set(specs) == set(CONTAINERS)
    secret_keys = set(secret_template()["stringData"])
    for process, spec in specs.items():
        c = container(objs, process)
        assert c["command"] == ["mpserve", *spec.args]
        assert "args" not in c
        env = env_of(c)
        assert set(env) == set(spec.env) | EXTRA_ENV[process] | OVERLAY_ENV[name], \
            f"{name}/{process}: the manifests and mpserve up set different variables"
        for key in ("MPSERVE_MODELS", "MPSERVE_LOG_LEVEL", "MPSERVE_DEFAULT_MODEL", "MPSERVE_SEED_DEFAULT"):
            if key in spec.env:
                assert str(env[key]["value"]).lower() == spec.env[key].lower(), key
        for var in env.values():  # a literal string, or a key of the Secret (never a literal token)
            assert ("value" in var) != ("valueFrom" in var), var
            if "value" in var:
                assert isinstance(var["value"], str), var
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret_template()["metadata"]["name"] and ref["key"] in secret_keys, var
        assert "valueFrom" in env.get("MPSERVE_ADMIN_TOKEN", {"valueFrom": True})
        # the shared model store, mounted where MPSERVE_STORE_DIR points, from the ReadWriteMany claim
        spec_pod = pod_spec(find(objs, "Deployment", CONTAINERS[process][0]))
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volume = mounts[env["MPSERVE_STORE_DIR"]["value"]]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec_pod["volumes"]
                  if "persistentVolumeClaim" in v}
        pvc = find(objs, "PersistentVolumeClaim", claims[volume])
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        redis_url = env["MPSERVE_REDIS_URL"]
        if name == "external-redis":
            assert redis_url["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
        else:  # the in-cluster Redis Service, by its name and port
            host, port = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", redis_url["value"]).groups()
            service = find(objs, "Service", host)
            assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert container(objs, "api")["image"] == container(objs, "worker")["image"]
    assert container(built["base"], "api")["image"] == "mpserve:latest"  # as docker-compose.yml


def test_api_and_worker_replicas(built):
    objs = built["base"]
    assert find(objs, "Deployment", "mpserve-api")["spec"]["replicas"] == 2
    # two workers: one leads each model by the Redis lease, the other stands by (the comment says so)
    assert find(objs, "Deployment", "mpserve-worker")["spec"]["replicas"] == 2
    text = (K8S / "base" / "worker.yaml").read_text().lower()
    assert "lease" in text and "standby" in text


# --------------------------------------------------------------------------------- (3) every name is a setting


def test_every_mpserve_name_is_a_setting(built):
    known = {env_name(f) for f in ServerSettings.model_fields} | {env_name(f) for f in WorkerSettings.model_fields}
    used = set()
    for path in yaml_files():
        used |= set(re.findall(r"MPSERVE_[A-Z0-9_]+", path.read_text()))
    assert used, "no MPSERVE_ variable found: the scan is broken"
    assert used <= known, f"not settings of the API or the worker: {sorted(used - known)}"
    for name, objs in built.items():  # and each process gets only its own class's settings
        for process, settings in SETTINGS.items():
            own = {env_name(f) for f in settings.model_fields}
            names = set(env_of(container(objs, process)))
            assert names <= own, f"{name}/{process}: {sorted(names - own)} are not {settings.__name__} settings"


@pytest.mark.parametrize("name", BUILDS)
def test_the_settings_accept_the_values(name: str, built, monkeypatch):
    """Each process's settings class parses the environment the manifests give it (Secret keys: the template's)."""
    placeholders = secret_template()["stringData"]
    for process, settings in SETTINGS.items():
        for var in [v for v in list(os.environ) if v.startswith("MPSERVE_")]:
            monkeypatch.delenv(var)
        for var in env_of(container(built[name], process)).values():
            value = var["value"] if "value" in var else placeholders[var["valueFrom"]["secretKeyRef"]["key"]]
            monkeypatch.setenv(var["name"], value)
        parsed = settings(_env_file=None)
        assert str(parsed.store_dir) == "/data/store" and parsed.models == ["fashion"]


# ---------------------------------------------------------------------------------------- (4) probes and ports


def named_port(c: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    return found


def test_api_probes_and_ports(built):
    objs = built["base"]
    c = container(objs, "api")
    port = int(env_of(c)["MPSERVE_PORT"]["value"])
    assert [p["containerPort"] for p in c["ports"]] == [port] == [8000]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c.get("startupProbe", {"httpGet": {"path": "/healthz"}})["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in c:
            assert named_port(c, c[probe]["httpGet"]["port"]) == port, probe
    service = find(objs, "Service", "mpserve-api")
    (service_port,) = service["spec"]["ports"]
    assert named_port(c, service_port["targetPort"]) == port
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][key]), key


def test_the_worker_has_no_http_port_nor_probe(built):
    c = container(built["base"], "worker")
    assert "ports" not in c
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert "httpGet" not in c.get(probe, {}), probe
        assert "exec" not in c.get(probe, {}), f"{probe}: mpserve has no command that checks a worker"
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][key]), key


def test_redis_is_durable_and_checked(built):
    objs = built["base"]
    redis = find(objs, "StatefulSet", "redis")
    (c,) = pod_spec(redis)["containers"]
    assert c["image"] == "redis:7.2-bookworm"
    cmd = c["command"]
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--appendfsync") + 1] in ("everysec", "always")
    assert c["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    (template,) = redis["spec"]["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}[template["metadata"]["name"]] == "/data"
    governing = find(objs, "Service", redis["spec"]["serviceName"])
    assert governing["spec"].get("clusterIP") == "None"
    assert named_port(c, find(objs, "Service", "redis")["spec"]["ports"][0]["targetPort"]) == 6379


@pytest.mark.parametrize("name", BUILDS)
def test_labels_and_selectors_agree(name: str, built):
    objs = built[name]
    pods = {(o["kind"], o["metadata"]["name"]): o["spec"]["template"]["metadata"]["labels"]
            for o in objs if o["kind"] in WORKLOADS}
    for key, labels in pods.items():
        selector = find(objs, *key)["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), key
    for other in pods:  # no workload's selector picks another's pods
        for key in pods:
            if key != other:
                assert not find(objs, *key)["spec"]["selector"]["matchLabels"].items() <= pods[other].items()

    def selected(selector: dict) -> list[tuple[str, str]]:
        return [key for key, labels in pods.items() if selector.items() <= labels.items()]

    for service in [o for o in objs if o["kind"] == "Service"]:
        assert len(selected(service["spec"]["selector"])) == 1, service["metadata"]["name"]
    pdb = find(objs, "PodDisruptionBudget", "mpserve-api")
    assert selected(pdb["spec"]["selector"]["matchLabels"]) == [("Deployment", "mpserve-api")]
    assert pdb["spec"]["minAvailable"] == 1
    hpa = find(objs, "HorizontalPodAutoscaler", "mpserve-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "mpserve-api") and ref["apiVersion"] == "apps/v1"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    for obj in objs:
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "mpserve", obj["metadata"]["name"]
        if obj["kind"] in WORKLOADS:
            for v in pod_spec(obj).get("volumes", []):
                if "persistentVolumeClaim" in v:
                    find(objs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])


# ------------------------------------------------------------------------------------------------ (5) overlays


def test_the_gpu_overlay_gives_api_and_worker_a_gpu(built):
    for process in CONTAINERS:
        base, gpu = container(built["base"], process), container(built["gpu"], process)
        assert "nvidia.com/gpu" not in base["resources"]["limits"] and "MPSERVE_DEVICE" not in env_of(base)
        assert str(gpu["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert env_of(gpu)["MPSERVE_DEVICE"]["value"] == "CUDA"
        assert gpu["image"] == "mpserve:gpu"
        spec = pod_spec(find(built["gpu"], "Deployment", CONTAINERS[process][0]))
        assert spec["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert container(built["gpu"], "api")["image"] == container(built["gpu"], "worker")["image"]


def test_the_external_redis_overlay_drops_the_in_cluster_redis(built):
    objs = built["external-redis"]
    assert not [o for o in objs if o["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]
    assert {(o["kind"], o["metadata"]["name"]) for o in built["base"]} - {(o["kind"], o["metadata"]["name"])
                                                                         for o in objs} == {
        ("StatefulSet", "redis"), ("Service", "redis"), ("Service", "redis-headless")}
    for process in CONTAINERS:
        assert "value" not in env_of(container(objs, process))["MPSERVE_REDIS_URL"]
