"""Render infra/k8s/rayservice.yaml: serveConfigV2 is services/configs/gpu-pools.yaml verbatim and
rayClusterConfig is infra/k8s/raycluster.yaml's spec plus the API-key secret. Run from the repo root:

    python infra/k8s/render_rayservice.py
"""

import yaml

HEADER = """\
# Serves the base (A100 pool) and chat (H100 pool) models. Rendered by infra/k8s/render_rayservice.py:
# serveConfigV2 is services/configs/gpu-pools.yaml verbatim and rayClusterConfig is the spec of
# infra/k8s/raycluster.yaml plus the API-key secret; tests/infra checks both stay equal.
#   kubectl create secret generic corral-api-keys --from-literal=keys=sk-...
#   kubectl apply -f infra/k8s/rayservice.yaml
"""
API_KEYS = {"name": "CORRAL_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "corral-api-keys", "key": "keys"}}}


class Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # write each group's env out in full
        return True


Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def main() -> None:
    cluster = yaml.safe_load(open("infra/k8s/raycluster.yaml"))["spec"]
    for group in cluster["workerGroupSpecs"] + [cluster["headGroupSpec"]]:
        for container in group["template"]["spec"]["containers"]:
            container["env"] = container["env"] + [API_KEYS]
    doc = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "corral-serve"},
           "spec": {"serveConfigV2": open("services/configs/gpu-pools.yaml").read(), "rayClusterConfig": cluster}}
    with open("infra/k8s/rayservice.yaml", "w") as f:
        f.write(HEADER + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=110))


if __name__ == "__main__":
    main()
