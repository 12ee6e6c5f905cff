"""The Serve config files parse as Serve reads them, and carry what the deployment needs."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from services.app import AppArgs, build_app
from tests.conftest import REPO

CONFIGS = REPO / "services/configs"


@pytest.mark.parametrize("name", ["local.yaml", "gpu-pools.yaml"])
def test_config_parses_as_serve_deploy_schema(name):
    config = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / name).read_text()))
    (app,) = config.applications
    assert app.import_path == "services.app:build_app"
    AppArgs.model_validate(app.args)
    assert {d.name for d in app.deployments} == {"OpenAIServer", "base", "chat"}


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
