"""What cannot run here (compose, Kubernetes, Dockerfile, S3 policy) is at least validated."""

import json
import re
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
SECRET_KEYS = re.compile(r"(PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY)", re.I)


def _compose():
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_has_the_whole_stack_with_health_checks():
    services = _compose()["services"]
    assert {"postgres", "minio", "minio-init", "prefect", "mlflow", "worker"} <= set(services)
    for name in ("postgres", "minio", "prefect", "mlflow"):
        assert "healthcheck" in services[name], name
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["prefect"]["condition"] == "service_healthy"


def test_compose_images_are_pinned():
    for name, svc in _compose()["services"].items():
        image = svc["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"{name}: {image!r} is not pinned to a version"


def test_compose_commits_no_default_secret():
    for name, svc in _compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_KEYS.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), f"{name}.{key} must come from the environment"
        for value in (svc.get("environment") or {}).values():
            for ref in re.findall(r"\$\{([A-Z_]+)([^}]*)\}", str(value)):
                assert ref[1].startswith(":?"), f"{name}: ${{{ref[0]}}} has a default; secrets must be required"


def test_auth_is_on_for_prefect_and_mlflow():
    services = _compose()["services"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect"]["environment"]
    assert "PREFECT_API_AUTH_STRING" in services["worker"]["environment"]
    assert "--app-name basic-auth" in services["mlflow"]["command"]
    import configparser

    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow-auth.ini")
    assert "admin_password" not in ini["mlflow"]  # the admin password comes from the environment
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${")


def test_worker_s3_policy_is_least_privilege():
    policy = json.loads((INFRA / "s3-worker-policy.json").read_text())
    actions = {(a, r) for st in policy["Statement"] for a in st["Action"] for r in st["Resource"]}
    writes = {r for a, r in actions if a in ("s3:PutObject", "s3:DeleteObject", "s3:*")}
    assert writes == {"arn:aws:s3:::shrinkflow/models/*"}  # write only under its prefix
    assert not any(a in ("s3:*", "*") for a, _ in actions)


def test_kubernetes_worker_and_gpu_job_template():
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "worker.yaml").read_text()))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].rsplit(":", 1)[-1] not in ("", "latest")
    template = json.loads((INFRA / "k8s" / "work-pool-template.json").read_text())
    job = template["job_configuration"]["job_manifest"]
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" in limits
    docker = json.loads((INFRA / "docker-work-pool.json").read_text())
    assert docker["job_configuration"]["gpus"] or docker["variables"]["properties"]["gpus"]


def test_dockerfile_pins_torch_and_python():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim", text, re.M)
    assert "torch==2.13.0" in text and "USER " in text
