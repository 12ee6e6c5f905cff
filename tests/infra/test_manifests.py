"""The cluster files, checked offline (no Docker engine or Kubernetes here): schemas plus the promises
the README makes about them (pinned images, loopback ports, health-gated start-up, GPU pools)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "infra/schemas"


def load(path):
    return yaml.safe_load((REPO / path).read_text())


def validate(doc, schema_name):
    jsonschema.validate(doc, json.loads((SCHEMAS / f"{schema_name}.schema.json").read_text()))


# -- docker compose ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    doc = load("docker-compose.yml")
    validate(doc, "compose")
    return doc


def test_compose_has_the_stack(compose):
    assert set(compose["services"]) == {"secrets-check", "postgres", "minio", "minio-init", "mlflow", "ray-head",
                                        "ray-worker"}
    assert set(compose["volumes"]) == {"postgres-data", "minio-data"}


def test_compose_images_are_pinned(compose):
    for name, svc in compose["services"].items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


def test_compose_ports_bind_to_loopback_by_default(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} on all interfaces"


def test_compose_start_order_is_health_gated(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            wanted = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond["condition"] == wanted, f"{name} -> {dep}"
            if wanted == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} needs a healthcheck"
    for ray_svc in ("ray-head", "ray-worker"):
        assert services[ray_svc]["shm_size"] and "ports" not in services["ray-worker"]  # workers scale
    for store in ("postgres", "minio"):  # nothing stores a secret before it is checked
        assert services[store]["depends_on"]["secrets-check"]["condition"] == "service_completed_successfully"


def test_compose_mlflow_uses_postgres_and_proxied_minio_artifacts(compose):
    mlflow = compose["services"]["mlflow"]
    cmd = " ".join(mlflow["command"])
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "--artifacts-destination=s3://" in cmd and "--serve-artifacts" in cmd
    worker_env = compose["services"]["ray-worker"]["environment"]
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert not any(k.startswith("AWS_") for k in worker_env), "workers need only MLFLOW_TRACKING_URI"


SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_S3_SECRET_KEY", "RAY_AUTH_TOKEN")
ONE_SHOT = ("secrets-check", "minio-init")


def env_example() -> dict[str, str]:
    return dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                if line and not line.startswith("#"))


def test_compose_keeps_secrets_off_command_lines(compose):
    """`ps` shows every process's command line to every user, `docker inspect` a container's
    command: no secret is interpolated into one. The one exception, documented in
    docs/security.md: `mc admin user add` takes the MLflow user's secret as an argument (shell-
    expanded inside the one-shot minio-init container, so `docker inspect` shows only its name)."""
    for name, svc in compose["services"].items():
        for part in ("command", "entrypoint", "healthcheck"):
            text = json.dumps(svc.get(part, ""))
            used = [s for s in SECRETS if f"${{{s}" in text]  # compose-time: the value itself in the command
            assert not used, f"{name}'s {part} carries {used}: pass secrets in the environment"
            runtime = [s for s in SECRETS if f"$${s}" in text]
            allowed = ["MLFLOW_S3_SECRET_KEY"] if (name, part) == ("minio-init", "command") else []
            assert runtime == allowed, f"{name}'s {part} puts {runtime} on a command line"
    assert "PASSWORD" not in compose["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "@" not in compose["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].split("@postgres")[0]


def test_compose_refuses_the_example_passwords(compose, tmp_path):
    """The secrets-check service's script, run here by sh as the container would run it."""
    script = compose["services"]["secrets-check"]["command"][0]
    assert "${" not in script.replace("$${", "")  # nothing for compose to fill in but $$ escapes
    script = script.replace("$$", "$")
    example = env_example()
    env = {k: example[k] for k in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_ROOT_USER",
                                   "MLFLOW_S3_ACCESS_KEY", "MLFLOW_S3_SECRET_KEY")}

    def check(**changes):
        return subprocess.run(["sh", "-c", script], env=env | changes, capture_output=True, text=True)

    refused = check()
    assert refused.returncode != 0 and "POSTGRES_PASSWORD is still the example value" in refused.stdout
    strong = {k: f"{k.lower()}-0123456789abcdef" for k in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD",
                                                            "MLFLOW_S3_SECRET_KEY")}
    assert check(**strong).returncode == 0
    for key in strong:  # each secret is checked, not just the first
        r = check(**strong | {key: example[key]})
        assert r.returncode != 0 and key in r.stdout, (key, r.stdout)
    assert "shorter than 16" in check(**strong | {"POSTGRES_PASSWORD": "short"}).stdout
    same = check(**strong | {"MLFLOW_S3_ACCESS_KEY": env["MINIO_ROOT_USER"]})
    assert same.returncode != 0 and "root user" in same.stdout
    for key in strong:  # compose itself refuses a missing or empty one (`:?`)
        assert f"${{{key}:?" in (REPO / "docker-compose.yml").read_text()


def test_mlflow_artifacts_use_a_dedicated_minio_user_not_the_root_account(compose):
    services = compose["services"]
    mlflow_env = services["mlflow"]["environment"]
    assert "MLFLOW_S3_ACCESS_KEY" in mlflow_env["AWS_ACCESS_KEY_ID"]
    assert "MLFLOW_S3_SECRET_KEY" in mlflow_env["AWS_SECRET_ACCESS_KEY"]
    assert not any("MINIO_ROOT" in str(v) for v in mlflow_env.values())
    init = services["minio-init"]["command"][0]
    assert "mc admin user add local \"$$MLFLOW_S3_ACCESS_KEY\"" in init
    assert "mc admin policy attach local mlflow-artifacts --user" in init
    assert '"arn:aws:s3:::%s", "arn:aws:s3:::%s/*"' in init and "s3:*" not in init  # that bucket, those actions


def test_env_file_is_git_ignored():
    r = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert r.returncode == 0, "add .env to .gitignore: it holds the stack's secrets"


def test_env_example_defines_every_variable_compose_reads(compose):
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", (REPO / "docker-compose.yml").read_text()))
    defined = set(env_example())
    assert used <= defined, f"add to .env.example: {sorted(used - defined)}"


def test_dockerfile_matches_the_pinned_versions():
    text = (REPO / "infra/docker/Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py311" in text
    assert "torch==2.13.0" in text and "pip install --no-cache-dir -e ." in text


# -- KubeRay and the cluster launcher ----------------------------------------------------------
@pytest.fixture(scope="module")
def raycluster():
    doc = load("infra/k8s/raycluster.yaml")
    validate(doc, "raycluster")
    return doc


def test_raycluster_has_cpu_a100_h100_groups_scaling_from_zero(raycluster):
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] and spec["autoscalerOptions"]["version"] == "v2"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "a100", "h100"}
    for name, accel in [("a100", "A100"), ("h100", "H100")]:
        g = groups[name]
        assert g["minReplicas"] == 0
        pod = g["template"]["spec"]
        assert accel in pod["nodeSelector"]["nvidia.com/gpu.product"]
        assert g["template"]["metadata"]["labels"]["ray.io/accelerator-type"] == accel
        assert g["rayStartParams"]["labels"] == f"ray.io/accelerator-type={accel}"
        assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) > 0


def test_rayjob_runs_the_7b_pipeline_on_the_cluster(raycluster):
    job = load("infra/k8s/rayjob-llama2-7b.yaml")
    validate(job, "rayjob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == raycluster["metadata"]["name"]
    spec_path = job["spec"]["entrypoint"].split()[-1]
    assert (REPO / spec_path).is_file(), f"the RayJob runs {spec_path}, which does not exist"


def test_cluster_launcher_yaml_passes_rays_own_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    doc = load("infra/ray/cluster.yaml")
    jsonschema.validate(doc, schema)
    types = doc["available_node_types"]
    assert types["a100_worker"]["resources"] == {"accelerator_type:A100": 1}
    assert types["h100_worker"]["resources"] == {"accelerator_type:H100": 1}
    assert all(t.get("min_workers", 0) == 0 for n, t in types.items() if n != doc["head_node_type"])


BIG_SPECS = ["llama2-7b", "llama2-13b", "llama2-70b"]


def test_every_pod_mounts_the_shared_file_system_at_the_specs_storage(raycluster):
    from pipelines.spec import load_spec

    claim = load("infra/k8s/storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = raycluster["spec"]
    for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/mnt/cluster_storage"]]["persistentVolumeClaim"]["claimName"] == \
            claim["metadata"]["name"], group.get("groupName", "head")
    launcher = load("infra/ray/cluster.yaml")
    assert "-v /mnt/cluster_storage:/mnt/cluster_storage" in launcher["docker"]["run_options"]
    assert any("mount -t lustre" in c and c.endswith(" /mnt/cluster_storage")
               for c in launcher["initialization_commands"])
    for name in BIG_SPECS:
        spec = load_spec(REPO / f"pipelines/specs/{name}.yaml")
        assert spec.storage.startswith("/mnt/cluster_storage/"), name


def test_gpu_groups_hold_every_step_of_the_big_specs(raycluster):
    """Each step's nodes (`corral plan`) fit its pool in the RayCluster and the cluster launcher."""
    from corral.plan import GPUS_PER_NODE
    from pipelines.spec import load_spec

    groups = {g["rayStartParams"].get("labels", "").partition("=")[2]: g
              for g in raycluster["spec"]["workerGroupSpecs"]}
    launcher = load("infra/ray/cluster.yaml")["available_node_types"]
    for name in BIG_SPECS:
        for plan in load_spec(REPO / f"pipelines/specs/{name}.yaml").plan():
            group = groups[plan.accelerator_type]
            assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) \
                == GPUS_PER_NODE
            assert plan.nodes <= group["maxReplicas"], (name, plan.step, plan.nodes)
            assert plan.nodes <= launcher[f"{plan.accelerator_type.lower()}_worker"]["max_workers"], (name, plan.step)


def test_schemas_reject_a_broken_manifest(raycluster):
    broken = json.loads(json.dumps(raycluster))
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, "raycluster")


def test_compose_passes_the_compose_specification_schema():
    # check-jsonschema vendors the Compose specification's own JSON schema
    r = subprocess.run([str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema",
                        "vendor.compose-spec", str(REPO / "docker-compose.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rayservice_serves_gpu_pools_on_the_raycluster(raycluster):
    svc = load("infra/k8s/rayservice.yaml")
    validate(svc, "rayservice")
    fix = "run `python infra/k8s/render_rayservice.py`"
    assert svc["spec"]["serveConfigV2"] == (REPO / "services/configs/gpu-pools.yaml").read_text(), fix
    cluster = json.loads(json.dumps(svc["spec"]["rayClusterConfig"]))
    for group in cluster["workerGroupSpecs"] + [cluster["headGroupSpec"]]:
        for c in group["template"]["spec"]["containers"]:
            c["env"] = [e for e in c["env"] if e["name"] != "CORRAL_API_KEYS"]
    assert cluster == raycluster["spec"], fix


def test_every_accelerator_type_used_exists_as_a_worker_group(raycluster):
    groups = {g["rayStartParams"].get("labels", "").partition("=")[2] for g in raycluster["spec"]["workerGroupSpecs"]}
    used = set()
    for spec in (REPO / "pipelines/specs").glob("*.yaml"):
        for step in load(spec.relative_to(REPO))["steps"].values():
            used.add(step.get("resources", {}).get("accelerator_type"))
            used.add((step.get("config") or {}).get("resources", {}).get("accelerator_type"))  # RL roles
    for cfg in (REPO / "services/configs").glob("*.yaml"):
        for app in load(cfg.relative_to(REPO))["applications"]:
            for dep in app.get("deployments", []):
                used.add(dep.get("ray_actor_options", {}).get("accelerator_type"))
    used.discard(None)
    assert used and used <= groups, f"no worker group for {sorted(used - groups)}"
