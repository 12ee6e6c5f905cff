"""The Serve config files parse as Serve reads them, and carry what the deployment needs."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from corral.config import ModelConfig
from services.app import AppArgs, build_app
from tests.conftest import REPO

CONFIGS = REPO / "services/configs"


@pytest.mark.parametrize("name", ["local.yaml", "gpu-pools.yaml"])
def test_config_parses_as_serve_deploy_schema(name):
    config = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / name).read_text()))
    assert config.applications[0].name == "corral"
    for app in config.applications:
        assert app.import_path == "services.app:build_app"
        args = AppArgs.model_validate(app.args)
        models = {role for role in ("base", "chat") if getattr(args, role) is not None}
        assert {d.name for d in app.deployments} == {"OpenAIServer", *models}
    assert len({app.route_prefix for app in config.applications}) == len(config.applications)


def test_gpu_pools_put_base_on_a100_and_chat_on_h100_with_autoscaling():
    app = yaml.safe_load((CONFIGS / "gpu-pools.yaml").read_text())["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    for name, accelerator in (("base", "A100"), ("chat", "H100")):
        d = deployments[name]
        assert d["ray_actor_options"]["accelerator_type"] == accelerator and d["ray_actor_options"]["num_gpus"] == 1
        scaling = d["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
        assert 0 < scaling["target_ongoing_requests"] < d["max_ongoing_requests"] and d["max_queued_requests"] > 0
        assert app["args"][name]["model"].startswith("models:/")


def test_gpu_pools_serve_every_model_on_vllm_and_70b_tensor_parallel_on_one_node():
    """70B: 8 GPUs of one node (a bundle each, STRICT_PACK) hold its bf16 weights with room for KV."""
    apps = {a["name"]: a for a in yaml.safe_load((CONFIGS / "gpu-pools.yaml").read_text())["applications"]}
    assert all(m["engine"] == "vllm" for a in apps.values() for m in (a["args"].get("base"), a["args"].get("chat"))
               if m)
    app = apps["llama2-70b"]
    model = AppArgs.model_validate(app["args"]).chat
    chat = next(d for d in app["deployments"] if d["name"] == "chat")
    gpu_bundles = [b for b in chat["placement_group_bundles"] if b.get("GPU")]
    assert model.vllm.tensor_parallel_size == len(gpu_bundles) == 8 and all(b["GPU"] == 1 for b in gpu_bundles)
    assert chat["placement_group_strategy"] == "STRICT_PACK" and "GPU" not in chat["placement_group_bundles"][0]
    assert chat["ray_actor_options"]["accelerator_type"] == "H100"
    weights_per_gpu = ModelConfig.preset("llama2-70b").num_params() * 2 / len(gpu_bundles)  # bf16
    assert weights_per_gpu < 0.5 * model.vllm.gpu_memory_utilization * 80e9  # at least half left for the KV cache


def test_vllm_settings_need_the_vllm_engine():
    with pytest.raises(ValueError, match="engine: vllm"):
        AppArgs.model_validate({"base": {"served_name": "b", "vllm": {"tensor_parallel_size": 2}}})


def test_model_path_comes_from_the_environment_when_args_omit_it(monkeypatch, tmp_path):
    args = yaml.safe_load((CONFIGS / "local.yaml").read_text())["applications"][0]["args"]
    monkeypatch.delenv("CORRAL_BASE_MODEL", raising=False)
    monkeypatch.delenv("CORRAL_CHAT_MODEL", raising=False)
    with pytest.raises(ValueError, match="CORRAL_BASE_MODEL"):
        build_app(args)
    monkeypatch.setenv("CORRAL_BASE_MODEL", str(tmp_path / "base"))
    monkeypatch.setenv("CORRAL_CHAT_MODEL", "models:/corral-chat/3")  # an alias is pinned against the registry
    ingress = build_app(args)._bound_deployment  # Serve's bound graph: (base, chat) are the ingress's args
    (base, base_name, base_source), (chat, chat_name, chat_source) = ingress.init_args[:2]
    assert (base_name, chat_name) == ("corral-base", "corral-chat")
    assert base._bound_deployment.init_kwargs["model"] == base_source == str(tmp_path / "base")
    assert chat._bound_deployment.init_kwargs["model"] == chat_source == "models:/corral-chat/3"
    assert chat._bound_deployment.init_kwargs["chat"] and not base._bound_deployment.init_kwargs["chat"]
