"""The pipeline spec: a YAML file naming steps, what each needs, its config and its resources.

    name: llama2-tiny
    tracking: {experiment: llama2-tiny}
    defaults: {model: tiny}
    steps:
      tokenizer: {uses: tokenizer, config: {inputs: [data/corpus], vocab_size: 4096}}
      data:      {uses: prepare_data, needs: [tokenizer], config: {inputs: [data/corpus]}}
      pretrain:  {uses: pretrain, needs: [data], config: {...}, resources: {num_workers: 2}}

`load_spec` reports every problem at once, each with the step id and field path, before any
cluster work starts: unknown step types, unknown or cyclic `needs`, bad config values,
(given the cluster's resources) requests no node can ever satisfy, and then steps that do not
fit their accelerators' memory (`corral.plan`).
"""

from __future__ import annotations

import copy
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.config import ModelConfig, ResourcesConfig
from corral.plan import DEFAULT_MFU, StepPlan, plan_step
from corral.stack import corral_home
from pipelines.steps import STEP_TYPES, step_config_class


class SpecError(ValueError):
    """All the problems found in a spec, one `location: message` per line."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class TrackingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experiment: str = Field(default="corral", min_length=1)


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uses: str
    needs: list[str] = []
    config: dict = {}
    resources: dict = {}  # validated per step (ResourcesConfig) so every step's problems are reported

    @property
    def resources_config(self) -> ResourcesConfig:
        return ResourcesConfig.model_validate(self.resources)


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    tracking: TrackingSpec = TrackingSpec()
    defaults: dict = Field(default={}, description="fields given to every step config that has them with a "
                                                    "non-None default, e.g. pretrain's model preset")
    storage: str | None = Field(default=None, description="where step outputs live; None = $CORRAL_HOME/pipelines")
    steps: dict[str, StepSpec] = Field(min_length=1)

    def order(self) -> list[str]:
        """Step ids in an order where every step comes after what it needs (the spec is acyclic)."""
        done: list[str] = []
        while len(done) < len(self.steps):
            done += [s for s, st in self.steps.items() if s not in done and all(n in done for n in st.needs)]
        return done

    def step_config(self, step_id: str, resources: ResourcesConfig | None = None) -> BaseModel:
        """The validated config object of one step, with the spec's defaults and resources applied."""
        step = self.steps[step_id]
        resources = resources or step.resources_config
        cls = step_config_class(step.uses)
        raw = dict(step.config)
        for key, value in self.defaults.items():
            # a field whose default is None is wired from upstream (e.g. evaluate's `model`)
            if key in cls.model_fields and key not in raw and cls.model_fields[key].default is not None:
                raw[key] = value
        if "resources" in cls.model_fields and cls.model_fields["resources"].annotation is ResourcesConfig:
            raw["resources"] = resources.model_dump()
        elif step.resources:  # e.g. PPO: one bundle per role, set in its config
            raise ValueError(f"step type {step.uses!r} takes its resources in config.resources, not here")
        if "tracking" in cls.model_fields:
            raw.setdefault("tracking", {})["experiment"] = self.tracking.experiment
        return cls.model_validate(raw)

    def step_model(self, step_id: str) -> ModelConfig | None:
        """The model a step trains or runs: its config's `model`, else the spec's `defaults.model`."""
        model = getattr(self.step_config(step_id), "model", None)
        model = model if isinstance(model, (str, ModelConfig)) else self.defaults.get("model")
        if model is None:
            return None
        return ModelConfig.preset(model) if isinstance(model, str) else ModelConfig.model_validate(model)

    def plan(self, mfu: float = DEFAULT_MFU) -> list[StepPlan]:
        """`corral.plan` for every step that trains or generates and whose model is known."""
        plans = []
        for sid in self.order():
            model = self.step_model(sid)
            if model is not None and (p := plan_step(sid, self.steps[sid].uses, self.step_config(sid), model, mfu)):
                plans.append(p)
        return plans

    def downstream(self, step_id: str) -> set[str]:
        """step_id and every step that needs it, directly or not."""
        out = {step_id}
        for s in self.order():
            if set(self.steps[s].needs) & out:
                out.add(s)
        return out


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """`steps.pretrain.config.loop.max_steps=10` style overrides; values parse as YAML scalars."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. steps.pretrain.config.loop.max_steps=10")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a mapping in the spec")
        node[leaf] = yaml.safe_load(value)
    return raw


def _loc(parts) -> str:
    return ".".join(str(p) for p in parts)


def validate_spec(raw: Mapping, source: str = "spec", cluster_nodes: Sequence[Mapping[str, float]] | None = None,
                  check_memory: bool = True) -> PipelineSpec:
    """Validate a parsed spec; raise SpecError listing every problem.

    cluster_nodes: each node's resources (e.g. {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1});
    when given, steps whose per-worker request no node can ever satisfy are reported too.
    check_memory: report steps that do not fit their accelerators (`corral plan` turns it off to
    print the whole plan first).
    """
    problems: list[tuple[str, str]] = []
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(source, [(_loc(err["loc"]), err["msg"]) for err in e.errors()]) from None

    for sid, step in spec.steps.items():
        if step.uses not in STEP_TYPES:
            problems.append((f"steps.{sid}.uses", f"unknown step type {step.uses!r}; "
                                                  f"choose one of {', '.join(STEP_TYPES)}"))
        for need in step.needs:
            if need not in spec.steps:
                problems.append((f"steps.{sid}.needs", f"unknown step {need!r}"))
    problems += [(f"steps.{sid}.needs", "is part of a cycle: " + " -> ".join(cycle)) for sid, cycle in _cycles(spec)]

    for sid, step in spec.steps.items():
        try:
            resources = step.resources_config
        except ValidationError as e:
            problems += [(_loc(("steps", sid, "resources", *err["loc"])), err["msg"]) for err in e.errors()]
            resources = ResourcesConfig()  # still check the config
        if step.uses in STEP_TYPES:
            try:
                spec.step_config(sid, resources)
            except ValidationError as e:
                problems += [(_loc(("steps", sid, "config", *err["loc"])), err["msg"]) for err in e.errors()]
            except ValueError as e:
                problems.append((f"steps.{sid}.resources", str(e)))
        if cluster_nodes is not None and not any(_fits(resources, node) for node in cluster_nodes):
            problems.append((f"steps.{sid}.resources", f"no node of the cluster can ever hold one worker "
                                                       f"({_describe(resources)})"))
    if problems or not check_memory:
        if problems:
            raise SpecError(source, problems)
        return spec
    try:  # only a spec whose configs are valid can be planned
        problems = [(f"steps.{p.step}", p.problem()) for p in spec.plan() if not p.fits]
    except ValueError as e:  # e.g. an accelerator type the plan has no size for
        problems = [("steps", str(e))]
    if problems:
        raise SpecError(source, problems)
    return spec


def _cycles(spec: PipelineSpec) -> list[tuple[str, list[str]]]:
    found, state = [], {}

    def visit(sid: str, path: list[str]):
        state[sid] = "visiting"
        for need in spec.steps[sid].needs:
            if need not in spec.steps:
                continue
            if state.get(need) == "visiting":
                found.append((sid, path[path.index(need):] + [sid, need]))
            elif need not in state:
                visit(need, path + [sid])
        state[sid] = "done"

    for sid in spec.steps:
        if sid not in state:
            visit(sid, [])
    return found


def _fits(res: ResourcesConfig, node: Mapping[str, float]) -> bool:
    return (res.cpus_per_worker <= node.get("CPU", 0) and res.gpus_per_worker <= node.get("GPU", 0)
            and (not res.accelerator_type or f"accelerator_type:{res.accelerator_type}" in node))


def _describe(res: ResourcesConfig) -> str:
    accel = f", accelerator_type {res.accelerator_type}" if res.accelerator_type else ""
    return f"{res.cpus_per_worker} CPUs, {res.gpus_per_worker} GPUs{accel}"


def expand_env(text: str) -> str:
    """${VAR} from the environment; ${CORRAL_HOME} defaults to corral's home directory."""
    env = {"CORRAL_HOME": str(corral_home()), **os.environ}
    return string.Template(text).safe_substitute(env)


def load_spec(path: str | Path, overrides: Sequence[str] = (),
              cluster_nodes: Sequence[Mapping[str, float]] | None = None, check_memory: bool = True) -> PipelineSpec:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pipeline spec {p} does not exist")
    try:
        raw = yaml.safe_load(expand_env(p.read_text()))
    except yaml.YAMLError as e:
        raise SpecError(str(p), [("yaml", str(e).replace("\n", " "))]) from None
    if not isinstance(raw, dict):
        raise SpecError(str(p), [("(top level)", "expected a mapping with name and steps")])
    return validate_spec(apply_overrides(raw, overrides), str(p), cluster_nodes, check_memory)
