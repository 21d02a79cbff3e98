"""deploy/k8s: every manifest validates against the Kubernetes schemas (offline, kubernetes-validate,
strict), the TLS component's JSON patches apply and the result validates too, and the files agree with
each other and with the code: selectors, ports, probes, the flags of `chameleon serve` and `chameleon
serve-model` (parsed by their real parsers), and the CHAMELEON_* variables the plugins read."""

from __future__ import annotations

import copy
import datetime
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from adapter_service.cli import build_parser as serve_parser
from adapter_service.core.artifact import load_artifact
from adapter_service.demo.run import DEMO_ARTIFACT
from chameleon_model_server.http_server import build_parser as serve_model_parser
from conftest import start_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests support (the kubelet's gRPC probe is GA from 1.27) and the newest
# schemas kubernetes-validate ships: a field unknown to either fails (strict).
K8S_VERSIONS = ("1.27", "1.37")
SIDECAR = "chameleon-sidecar"
CLIENT_LABEL = ("chameleon.dev/adapter-client", "true")
# Each model server, and the sources whose string literals name the CHAMELEON_* variables it reads.
CLIENT = [ROOT / "adapter_service" / "client"]
SETTINGS_SOURCES = {
    "chameleon-example-server": [ROOT / "examples" / "model_server", *CLIENT],
    "chameleon-tgi": [ROOT / "plugins" / "chameleon_tgi", *CLIENT],
    "chameleon-vllm": [ROOT / "plugins" / "chameleon_vllm", *CLIENT],
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")


# -- loading ----------------------------------------------------------------------------------------


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomizations(root: Path) -> dict[Path, dict]:
    """Each kustomization.yaml under `root`, by its directory."""
    return {path.parent: load_yaml(path)[0] for path in sorted(root.rglob("kustomization.yaml"))}


def patch_files(root: Path) -> set[Path]:
    return {
        (folder / patch["path"]).resolve()
        for folder, kustomization in kustomizations(root).items()
        for patch in kustomization.get("patches", [])
    }


def manifest_files(root: Path) -> list[Path]:
    """The YAML files that are Kubernetes resources (not kustomizations, not patches)."""
    patches = patch_files(root)
    return [
        path
        for path in sorted(root.rglob("*.yaml"))
        if path.name != "kustomization.yaml" and path.resolve() not in patches
    ]


@functools.cache
def _base() -> tuple[dict, ...]:
    return tuple(doc for path in manifest_files(K8S) for doc in load_yaml(path))


def base() -> list[dict]:
    """Every resource of deploy/k8s, as shipped (a fresh copy)."""
    return copy.deepcopy(list(_base()))


# -- kustomize, the parts these manifests use ---------------------------------------------------------


def _tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


def apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add, remove, replace and test, on a copy of `doc`."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _tokens(op["path"])
        node: Any = doc
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        kind, value = op["op"], copy.deepcopy(op.get("value"))
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if not 0 <= index <= len(node) - (kind != "add"):
                raise IndexError(f"{op['path']}: no element {index}")
        elif kind != "add" and last not in node:
            raise KeyError(f"{op['path']}: no such member")
        else:
            index = last
        if kind == "add" and isinstance(node, list):
            node.insert(index, value)
        elif kind in ("add", "replace"):
            node[index] = value
        elif kind == "remove":
            del node[index]
        elif kind == "test":
            if node[index] != value:
                raise ValueError(f"{op['path']}: test failed, found {node[index]!r}, expected {value!r}")
        else:
            raise ValueError(f"unsupported op {kind!r}")
    return doc


def selects(target: dict, doc: dict) -> bool:
    """Whether a kustomize patch target (group, version, kind, name, labelSelector k=v,...) selects `doc`."""
    group, _, version = doc["apiVersion"].rpartition("/")
    labels = doc["metadata"].get("labels", {})
    wanted = dict(pair.split("=", 1) for pair in target.get("labelSelector", "").split(",") if pair)
    return (
        target.get("group", group) == group
        and target.get("version", version) == version
        and target.get("kind", doc["kind"]) == doc["kind"]
        and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
        and all(labels.get(key) == value for key, value in wanted.items())
    )


def with_component(docs: list[dict], component: Path) -> list[dict]:
    """`docs` with the component's JSON patches applied; each patch must select something."""
    kustomization = load_yaml(component / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Component"
    docs = copy.deepcopy(docs)
    for patch in kustomization["patches"]:
        ops = load_yaml(component / patch["path"])[0]
        hits = [i for i, doc in enumerate(docs) if selects(patch["target"], doc)]
        assert hits, f"{component.name}/{patch['path']} selects no resource"
        for i in hits:
            docs[i] = apply_json_patch(docs[i], ops)
    return docs


def variant(name: str) -> list[dict]:
    return base() if name == "base" else with_component(base(), K8S / name)


VARIANTS = ("base", "tls")


# -- lookups ----------------------------------------------------------------------------------------


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = find(docs, kind, name)
    return doc


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]


def containers(deployment: dict, init: bool = False) -> list[dict]:
    spec = pod(deployment)["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def main_container(deployment: dict) -> dict:
    return containers(deployment)[0]


def env(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def container_ports(container: dict) -> dict[str | int, int]:
    """Port names and numbers -> numbers."""
    ports = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def mount_of(container: dict, path: str) -> dict:
    """The volume mount that holds `path`."""
    holders = [m for root, m in mounts(container).items() if path == root or path.startswith(root + "/")]
    assert holders, f"{path} is not on any volume of container {container['name']}"
    return max(holders, key=lambda m: len(m["mountPath"]))


def volume(deployment: dict, name: str) -> dict:
    (found,) = [v for v in pod(deployment)["spec"]["volumes"] if v["name"] == name]
    return found


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def model_servers(docs: list[dict]) -> list[dict]:
    key, value = CLIENT_LABEL
    return [d for d in find(docs, "Deployment") if pod(d)["metadata"]["labels"].get(key) == value]


def parse(parser: Any, argv: list[str]) -> Any:
    """The real parser's namespace; a refused flag fails the test (argparse's message is on stderr)."""
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{parser.prog} refuses {argv} (its message is in the captured stderr)")


def serve_args(docs: list[dict]) -> Any:
    container = main_container(one(docs, "Deployment", SIDECAR))
    assert container["command"][:2] == ["chameleon", "serve"]
    return parse(serve_parser(), [*container["command"][1:], *container["args"]])


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# -- schemas ----------------------------------------------------------------------------------------


def test_the_manifests_are_all_there() -> None:
    kinds = sorted(d["kind"] for d in base())
    assert kinds == sorted(
        ["Deployment"] * 4
        + ["Service"] * 4
        + ["HorizontalPodAutoscaler", "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget"]
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", VARIANTS)
def test_every_resource_validates(name: str, version: str) -> None:
    problems = []
    for doc in variant(name):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")
    assert not problems, "\n".join(problems)


def kustomization_problems(root: Path) -> list[str]:
    """What is wrong with the kustomizations under `root`: entries naming nothing, and YAML files (or
    model-server folders) no kustomization lists."""
    problems, listed = [], set()
    images = {
        container["image"].rsplit(":", 1)[0]
        for path in manifest_files(root)
        for doc in load_yaml(path)
        if doc["kind"] == "Deployment"
        for container in containers(doc, init=True)
    }
    for folder, kustomization in kustomizations(root).items():
        where = folder.relative_to(root) / "kustomization.yaml"
        for entry in kustomization.get("resources", []):
            target = folder / entry
            if target.is_file():
                listed.add(target.resolve())
            elif not (target / "kustomization.yaml").is_file():
                problems.append(f"{where}: resource {entry} is neither a file nor a kustomization")
        for entry in kustomization.get("components", []):
            if not (folder / entry / "kustomization.yaml").is_file():
                problems.append(f"{where}: component {entry} is not a kustomization")
        for patch in kustomization.get("patches", []):
            if not (folder / patch["path"]).is_file():
                problems.append(f"{where}: patch {patch['path']} does not exist")
            listed.add((folder / patch["path"]).resolve())
        for image in kustomization.get("images", []):
            if image["name"] not in images:
                problems.append(f"{where}: image {image['name']} is used by no container")
    for path in sorted(root.rglob("*.yaml")):
        if path.name != "kustomization.yaml" and path.resolve() not in listed:
            problems.append(f"{path.relative_to(root)} is listed by no kustomization")
    # The root kustomization names every choice (commented out or not), so the operator sees them all.
    root_text = (root / "kustomization.yaml").read_text()
    for folder in kustomizations(root):
        name = str(folder.relative_to(root))
        if folder != root and not re.search(rf"- {re.escape(name)}\s*$", root_text, re.M):
            problems.append(f"the root kustomization.yaml does not mention {name}")
    return problems


def test_kustomizations_name_existing_files_and_list_every_manifest() -> None:
    assert kustomization_problems(K8S) == []


def test_the_checks_catch_broken_manifests(tmp_path: Path) -> None:
    """A deliberately broken copy: an unknown field, a wrong type, an unlisted file, a missing resource."""
    broken = tmp_path / "k8s"
    shutil.copytree(K8S, broken)
    deployment = load_yaml(broken / "sidecar" / "deployment.yaml")[0]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(misspelt, K8S_VERSIONS[-1], strict=True)
    mistyped = copy.deepcopy(deployment)
    mistyped["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "thirty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(mistyped, K8S_VERSIONS[0], strict=True)

    (broken / "sidecar" / "extra.yaml").write_text((broken / "sidecar" / "pdb.yaml").read_text())
    (broken / "model-servers" / "vllm" / "service.yaml").unlink()
    problems = kustomization_problems(broken)
    assert any("extra.yaml is listed by no kustomization" in p for p in problems), problems
    assert any("resource service.yaml" in p for p in problems), problems

    with pytest.raises(ValueError, match="test failed"):
        apply_json_patch(deployment, [{"op": "test", "path": "/spec/revisionHistoryLimit", "value": 1}])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not here")
def test_kustomize_builds_what_the_tests_check(tmp_path: Path) -> None:
    """The real kustomize, where kubectl is installed: the base as shipped, then every model server with
    the TLS component, must build into exactly the resources the tests above check."""
    shipped = _kustomize(K8S)
    assert {(d["kind"], d["metadata"]["name"]) for d in shipped} >= {
        ("Deployment", SIDECAR),
        ("Deployment", "chameleon-example-server"),
    }
    everything = tmp_path / "k8s"
    shutil.copytree(K8S, everything)
    kustomization = load_yaml(everything / "kustomization.yaml")[0]
    kustomization["resources"] = [
        "sidecar",
        "model-pvc.yaml",
        *(f"model-servers/{name}" for name in ("example", "tgi", "vllm")),
    ]
    kustomization["components"] = ["tls"]
    (everything / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    built = {(d["kind"], d["metadata"]["name"]): d for d in _kustomize(everything)}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in variant("tls")}
    assert built == ours


def _kustomize(folder: Path) -> list[dict]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


# -- wiring -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_services_select_one_deployment_and_target_its_ports(name: str) -> None:
    docs = variant(name)
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"]
        chosen = [d for d in find(docs, "Deployment") if matches(selector, pod(d)["metadata"]["labels"])]
        assert [d["metadata"]["name"] for d in chosen] == [service["metadata"]["name"]]
        (deployment,) = chosen
        assert matches(deployment["spec"]["selector"]["matchLabels"], pod(deployment)["metadata"]["labels"])
        ports = container_ports(main_container(deployment))
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port['targetPort']}"
            if service["spec"].get("clusterIP") == "None":  # nothing proxies: clients dial the pod port
                assert port["port"] == ports[port["targetPort"]]


def test_the_sidecar_service_is_headless_and_speaks_grpc() -> None:
    spec = one(base(), "Service", SIDECAR)["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is False
    assert {p["name"]: p.get("appProtocol") for p in spec["ports"]}["grpc"] == "grpc"


def test_pdb_and_hpa_target_the_sidecar() -> None:
    docs = base()
    deployment = one(docs, "Deployment", SIDECAR)
    labels = pod(deployment)["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget", SIDECAR)["spec"]
    assert matches(pdb["selector"]["matchLabels"], labels)
    for other in find(docs, "Deployment"):
        if other is not deployment:
            assert not matches(pdb["selector"]["matchLabels"], pod(other)["metadata"]["labels"])
    hpa = one(docs, "HorizontalPodAutoscaler", SIDECAR)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SIDECAR}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb["minAvailable"] < hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] < 100
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; apply would reset it"


@pytest.mark.parametrize("name", VARIANTS)
def test_probes_have_one_handler_on_a_declared_port(name: str) -> None:
    for deployment in find(variant(name), "Deployment"):
        for container in containers(deployment):
            ports = container_ports(container)
            assert all(probe in container for probe in PROBES), container["name"]
            for probe in PROBES:
                (handler,) = [h for h in HANDLERS if h in container[probe]]
                if handler in ("httpGet", "tcpSocket", "grpc"):
                    assert container[probe][handler]["port"] in ports, f"{container['name']} {probe}"


@pytest.mark.parametrize("name", VARIANTS)
def test_the_sidecar_flags_parse_and_agree_with_the_manifest(name: str) -> None:
    docs = variant(name)
    deployment = one(docs, "Deployment", SIDECAR)
    container = main_container(deployment)
    args = serve_args(docs)
    host, port = args.address.rsplit(":", 1)
    ports = container_ports(container)
    assert host == "0.0.0.0" and int(port) == ports["grpc"] == 50051
    grpc_port = {p["name"]: p for p in one(docs, "Service", SIDECAR)["spec"]["ports"]}["grpc"]
    assert ports[grpc_port["targetPort"]] == int(port)
    assert re.fullmatch(r"[0-9a-f]{64}", args.expect_sha256)
    assert args.metrics_address == "0.0.0.0" and args.metrics_port == ports["metrics"]
    annotations = pod(deployment)["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == args.metrics_port
    assert args.grace < pod(deployment)["spec"]["terminationGracePeriodSeconds"]
    assert args.workers * max(args.ort_threads, 1) <= cpu_cores(container["resources"]["limits"]["cpu"])
    assert args.max_connection_age > 0
    assert not args.plain_logs  # JSON lines, which log collectors parse
    if name == "base":
        assert args.allow_insecure_remote and not (args.tls_cert or args.auth_token_file)
    else:
        assert not args.allow_insecure_remote and args.tls_cert and args.tls_key and args.auth_token_file


def test_the_pinned_sha256_is_the_demo_artifacts() -> None:
    """The default pins the artifact the artifact image ships by default."""
    assert serve_args(base()).expect_sha256 == load_artifact(DEMO_ARTIFACT).sha256
    dockerfile = (K8S / "artifact" / "Dockerfile").read_text()
    (default,) = re.findall(r"^ARG ARTIFACT=(\S+)$", dockerfile, re.M)
    assert (ROOT / default).resolve() == DEMO_ARTIFACT.resolve()


def test_the_artifact_is_copied_in_and_served_read_only() -> None:
    docs = base()
    deployment = one(docs, "Deployment", SIDECAR)
    args = serve_args(docs)
    served = mount_of(main_container(deployment), args.artifact)
    assert served["mountPath"] == args.artifact and served["readOnly"] is True
    assert "emptyDir" in volume(deployment, served["name"])
    (init,) = pod(deployment)["spec"]["initContainers"]
    (written,) = [m for m in init["volumeMounts"] if m["name"] == served["name"]]
    assert not written.get("readOnly") and init["command"][-1].rstrip("/") == written["mountPath"]
    assert init["image"].split(":")[0] == "chameleon-artifact"


def _user_of(dockerfile: Path) -> int:
    (user,) = re.findall(r"^USER (\d+)$", dockerfile.read_text(), re.M)
    return int(user)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("deployment_name", [SIDECAR, "chameleon-example-server"])
def test_restricted_pod_security(name: str, deployment_name: str) -> None:
    deployment = one(variant(name), "Deployment", deployment_name)
    spec = pod(deployment)["spec"]
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    for container in containers(deployment, init=True):
        effective = {**spec["securityContext"], **container.get("securityContext", {})}
        assert effective["runAsNonRoot"] is True, container["name"]
        assert effective["runAsUser"] == _user_of(ROOT / "deploy" / "sidecar" / "Dockerfile")
        assert effective["readOnlyRootFilesystem"] is True
        assert effective["allowPrivilegeEscalation"] is False
        assert effective["capabilities"] == {"drop": ["ALL"]}
        assert effective["seccompProfile"] == {"type": "RuntimeDefault"}
        for mount in container.get("volumeMounts", []):  # what is writable is a scratch emptyDir
            source = volume(deployment, mount["name"])
            assert mount.get("readOnly") or "emptyDir" in source, f"{container['name']}: {mount}"


def _sidecar_target(docs: list[dict]) -> str:
    service = one(docs, "Service", SIDECAR)
    port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    return f"dns:///{service['metadata']['name']}:{port}"


def _sidecar_address(container: dict) -> str:
    if container.get("command", [])[:2] == ["chameleon", "serve-model"]:
        return parse(serve_model_parser(), container["args"]).sidecar
    return env(container)["CHAMELEON_SIDECAR"]


@pytest.mark.parametrize("name", VARIANTS)
def test_model_servers_dial_the_sidecar_service(name: str) -> None:
    docs = variant(name)
    servers = model_servers(docs)
    assert sorted(d["metadata"]["name"] for d in servers) == sorted(SETTINGS_SOURCES)
    for deployment in servers:
        assert _sidecar_address(main_container(deployment)) == _sidecar_target(docs)


def test_the_network_policy_admits_the_model_servers_to_grpc_only() -> None:
    docs = base()
    sidecar = one(docs, "Deployment", SIDECAR)
    ports = container_ports(main_container(sidecar))
    (policy,) = [
        p
        for p in find(docs, "NetworkPolicy")
        if matches(p["spec"]["podSelector"]["matchLabels"], pod(sidecar)["metadata"]["labels"])
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]

    def admitted(labels: dict, port: int) -> bool:
        return any(
            any(ports.get(p["port"]) == port for p in rule["ports"])
            and any(
                "namespaceSelector" not in peer and matches(peer["podSelector"]["matchLabels"], labels)
                for peer in rule["from"]
            )
            for rule in policy["spec"]["ingress"]
        )

    for deployment in model_servers(docs):
        labels = pod(deployment)["metadata"]["labels"]
        assert admitted(labels, ports["grpc"]), deployment["metadata"]["name"]
        assert not admitted(labels, ports["metrics"]), deployment["metadata"]["name"]
    assert not admitted({"app": "anything-else"}, ports["grpc"])


def test_prometheus_annotations_name_a_declared_port() -> None:
    scraped = 0
    for deployment in find(base(), "Deployment"):
        annotations = pod(deployment)["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        scraped += 1
        container = main_container(deployment)
        port = int(annotations["prometheus.io/port"])
        assert port in container_ports(container).values(), deployment["metadata"]["name"]
        assert annotations["prometheus.io/path"] == "/metrics"
        if "CHAMELEON_METRICS_PORT" in env(container):  # the plugin's own endpoint
            assert int(env(container)["CHAMELEON_METRICS_PORT"]) == port
    assert scraped == 4


def test_serve_model_flags_parse_and_agree_with_the_manifest() -> None:
    deployment = one(base(), "Deployment", "chameleon-example-server")
    container = main_container(deployment)
    args = parse(serve_model_parser(), container["args"])
    assert args.host == "0.0.0.0" and args.port == container_ports(container)["http"]
    assert args.grace < pod(deployment)["spec"]["terminationGracePeriodSeconds"]
    assert mount_of(container, args.model)["mountPath"] == args.model


def test_model_servers_mount_the_model_claim_read_only() -> None:
    docs = base()
    claim = one(docs, "PersistentVolumeClaim", "chameleon-model")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    for deployment in model_servers(docs):
        model = mounts(main_container(deployment))["/model"]
        assert model["readOnly"] is True
        source = volume(deployment, model["name"])["persistentVolumeClaim"]
        assert source == {"claimName": claim["metadata"]["name"], "readOnly": True}


def _literals(folders: list[Path]) -> str:
    return "\n".join(
        path.read_text()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.suffix in (".py", ".pth") and path.is_file()
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_every_chameleon_variable_is_read_by_its_server(name: str) -> None:
    for deployment in model_servers(variant(name)):
        sources = _literals(SETTINGS_SOURCES[deployment["metadata"]["name"]])
        names = [n for n in env(main_container(deployment)) if n.startswith("CHAMELEON_")]
        unread = [n for n in names if not re.search(rf"[\"']{n}[\"']", sources)]
        assert not unread, f"{deployment['metadata']['name']} sets variables nothing reads: {unread}"


# -- the TLS variant --------------------------------------------------------------------------------


def _secret_file(deployment: dict, container: dict, path: str) -> tuple[str, str]:
    """("secret" | "configMap", its name) of the read-only volume that holds `path`."""
    mount = mount_of(container, path)
    assert mount["readOnly"] is True
    source = volume(deployment, mount["name"])
    kind = "secret" if "secret" in source else "configMap"
    return kind, source[kind]["secretName" if kind == "secret" else "name"]


def test_tls_sidecar_and_clients_share_the_ca_token_and_name() -> None:
    docs = variant("tls")
    sidecar = one(docs, "Deployment", SIDECAR)
    container = main_container(sidecar)
    args = serve_args(docs)
    tls = _secret_file(sidecar, container, args.tls_cert)
    assert tls == _secret_file(sidecar, container, args.tls_key)
    assert tls[0] == "secret"
    assert Path(args.tls_cert).name == "tls.crt" and Path(args.tls_key).name == "tls.key"  # kubernetes.io/tls
    token = _secret_file(sidecar, container, args.auth_token_file)
    probe = container["readinessProbe"]["exec"]["command"][-1]
    (probe_ca,) = re.findall(r"ca_file='([^']+)'", probe)
    (probe_name,) = re.findall(r"server_name='([^']+)'", probe)
    ca = _secret_file(sidecar, container, probe_ca)
    assert probe_name == SIDECAR
    for deployment in model_servers(docs):
        client = main_container(deployment)
        settings = env(client)
        assert _secret_file(deployment, client, settings["CHAMELEON_TLS_CA"]) == ca
        assert _secret_file(deployment, client, settings["CHAMELEON_AUTH_TOKEN_FILE"]) == token
        assert settings["CHAMELEON_TLS_SERVER_NAME"] == probe_name
    readme = (K8S / "README.md").read_text()
    for _, object_name in (tls, token, ca):
        assert object_name in readme, f"README.md does not say how to create {object_name}"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _certificates(folder: Path, server_name: str) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for `server_name`: (ca.crt, tls.crt, tls.key)."""
    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, key: Any, signer: Any, issuer: x509.Name, ca: bool) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = issue("chameleon test CA", ca_key, ca_key, None, ca=True)
    server = issue(server_name, server_key, ca_key, ca.subject, ca=False)
    paths = folder / "ca.crt", folder / "tls.crt", folder / "tls.key"
    paths[0].write_bytes(_pem(ca))
    paths[1].write_bytes(_pem(server))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def test_the_tls_probe_checks_a_tls_sidecar_that_requires_a_token(tmp_path: Path) -> None:
    """The exec probe, run as the kubelet would (with the files where this test made them), against a
    real sidecar serving TLS with a token: SERVING passes; a sidecar gone fails."""
    container = main_container(one(variant("tls"), "Deployment", SIDECAR))
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    code = command[2]
    (ca_file,) = re.findall(r"ca_file='([^']+)'", code)
    (server_name,) = re.findall(r"server_name='([^']+)'", code)
    ca, cert, key = _certificates(tmp_path, server_name)
    server = start_server(DEMO_ARTIFACT, tls_cert=cert, tls_key=key, auth_token="t0ken")
    try:
        probe = code.replace(ca_file, str(ca)).replace("127.0.0.1:50051", server.address)
        assert probe != code and server.address.startswith("127.0.0.1:")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    finally:
        server.stop()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
