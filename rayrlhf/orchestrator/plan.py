"""The actor plan of an online job: which actors it starts, what each reserves, which code path each takes.

Computed from the config alone, before Ray starts, so a GPU job can be checked on a laptop:
`rayrlhf validate` prints it, `rayrlhf train` refuses a plan with problems before any actor
starts (exit 2, naming the keys), and `System` creates its actors with the plan's names and
resources. A combination the code cannot run is a problem here, not a crash on a cluster:
tensor parallelism on the transformers backend, ranks of one NCCL group sharing a GPU, an
engine reserving fewer GPUs than its tensor-parallel size, a collective weight sync between a
GPU trainer and CPU engines, or weight updates into a transformers engine whose in-memory
layout differs from its checkpoint (mixture-of-experts models).

With `model.lora` the plan says how the adapter runs: the policy group trains only the adapter and
is also the reference policy (the adapter switched off, in its own process: no reference actor and
no second copy of the weights), and the weight sync sends the adapter alone into vLLM's LoRA slots
or, for engines that cannot serve it, the weights with the adapter merged in (`model.lora.sync`).

With `servers.colocate` the reference and reward-model servers sit beside policy ranks (`ActorSpec.beside`): each
shares its rank's placement-group bundle, and on GPUs a fraction of its GPU, which the rank then does not ask for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rayrlhf.config import ConfigError, JobConfig
from rayrlhf.models.lora import vllm_max_lora_rank
from rayrlhf.models.tiny import TINY_PREFIX


@dataclass(frozen=True)
class ActorSpec:
    """One actor: its dashboard name, Ray resources, and the code path it will take."""

    name: str
    role: str  # rollout | policy | critic | reference | reward
    num_cpus: float
    num_gpus: float
    path: str
    beside: str | None = None  # servers.colocate: the policy rank whose placement-group bundle (and GPU) it shares


@dataclass(frozen=True)
class ActorPlan:
    actors: list[ActorSpec]
    weight_sync: str
    problems: list[str] = field(default_factory=list)

    def of(self, role: str) -> list[ActorSpec]:
        return [a for a in self.actors if a.role == role]

    @property
    def total_cpus(self) -> float:
        return sum(a.num_cpus for a in self.actors)

    @property
    def total_gpus(self) -> float:
        return sum(a.num_gpus for a in self.actors if not a.beside)  # a server beside a rank uses part of its GPU

    def describe(self) -> str:
        """The plan as a few lines: one per group of actors, then the weight sync and the totals."""
        lines, seen = [], set()
        for actor in self.actors:
            key = (actor.role, actor.path, actor.num_cpus, actor.num_gpus)
            if key in seen:
                continue
            seen.add(key)
            names = [a.name for a in self.actors if (a.role, a.path, a.num_cpus, a.num_gpus) == key]
            shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            lines.append(f"  {shown:<22} {len(names)} x ({actor.num_cpus:g} CPU, {actor.num_gpus:g} GPU)  {actor.path}")
        lines.append(f"  weight sync            {self.weight_sync}")
        lines.append(f"  total                  {self.total_cpus:g} CPU, {self.total_gpus:g} GPU")
        return "\n".join(lines)


def _gpu(num_gpus: float) -> bool:
    return num_gpus > 0


def _policy_config(name: str) -> Any:
    """The transformers config of a local model or a `tiny:` row; None where it cannot be read here (a hub id,
    offline) or names custom modelling code (`auto_map`: its layout is not known without running that code)."""
    if name == "tiny" or name.startswith(TINY_PREFIX):
        from rayrlhf.models.architectures import architecture_config

        return architecture_config(name.removeprefix(TINY_PREFIX) if name != "tiny" else "llama")
    if not (Path(name) / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception:  # noqa: BLE001 - unreadable here: preflight names model.policy with the reason
        return None
    return None if getattr(config, "auto_map", None) else config


def hf_engine_can_update(name: str) -> bool | None:
    """Whether the transformers engine can take weight updates for policy `name`: its in-memory weights are
    its checkpoint's up to names (`hf_layout.checkpoint_renames`, the engine's own test, here on a model built
    on the meta device from config.json, with no weights); None when that cannot be known before it loads."""
    config = _policy_config(name)
    if config is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM

    from rayrlhf.models.hf_layout import checkpoint_renames

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - a model transformers cannot build here: the engine will say why
        return None
    return checkpoint_renames(model) is not None


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


HF_BACKEND_MAX_BYTES = 1024**3  # rollout.backend auto: transformers generate below this on CPU


def resolve_backend(cfg: JobConfig) -> str:
    """rollout.backend with `auto` decided: vLLM on GPUs, with tensor parallelism, for a hub model (its size is
    unknown here) or one of 1 GB and more, and for layouts the transformers engine cannot update; transformers
    generate for a smaller local model on CPU, where its lower per-step overhead wins (measured: docs/performance.md).
    Without vLLM installed, auto is transformers generate (`plan_actors` refuses what it cannot take)."""
    r = cfg.rollout
    if r.backend != "auto":
        return r.backend
    from rayrlhf.actors.resources import checkpoint_bytes

    policy = cfg.model.policy
    small = policy == "tiny" or policy.startswith(TINY_PREFIX) or (checkpoint_bytes(policy) or HF_BACKEND_MAX_BYTES) < HF_BACKEND_MAX_BYTES
    wants_vllm = _gpu(r.num_gpus) or r.tensor_parallel_size > 1 or not small
    if (wants_vllm or hf_engine_can_update(policy) is False) and vllm_available():
        return "vllm"
    return "hf"


def _trainer_path(cfg: JobConfig, role: str, gpu: bool, ranks: int) -> str:
    t, lora = cfg.trainer, cfg.model.lora
    if t.bf16 is not None:
        precision = "bf16" if t.bf16 else "fp32"
    elif cfg.model.dtype == "bfloat16":
        precision = "bf16"
    else:
        precision = "bf16 where supported" if gpu else "fp32"
    adapter = ""
    if lora is not None and role == "policy":
        targets = lora.target_modules if isinstance(lora.target_modules, str) else "/".join(lora.target_modules)
        adapter = f", LoRA rank {lora.rank} on {targets} (only the adapter trains)"
        if lora_reference(cfg):
            adapter += "; also the reference: this model with its adapter off, no second copy of the weights"
    return (f"DeepSpeed ZeRO-{t.stage_for(ranks)}, {'nccl' if gpu else 'gloo'}, {precision}"
            + (", gradient checkpointing" if t.gradient_checkpointing else "")
            + (f", offload {t.offload} to host memory" if t.offload != "none" else "") + adapter)


def _is_moe(name: str | None) -> bool:
    """Whether a local model or a `tiny:` row is a mixture of experts (False for a hub id: unknown offline)."""
    if name is None:
        return False
    if name == "tiny" or name.startswith(TINY_PREFIX):
        from rayrlhf.models.architectures import architecture

        values = architecture(name.removeprefix(TINY_PREFIX) if name != "tiny" else "llama").config
    else:
        config = Path(name) / "config.json"
        values = json.loads(config.read_text()) if config.is_file() else {}
    return any(int(values.get(k) or 0) > 1 for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def lora_reference(cfg: JobConfig) -> bool:
    """Whether the reference policy is the LoRA policy with its adapter off (in the policy trainer's process):
    a LoRA job whose reference is the policy's own base model, and a KL that needs a reference at all."""
    ref = cfg.model.reference
    return cfg.model.lora is not None and cfg.algorithm.needs_reference and (ref is None or ref == cfg.model.policy)


def resolve_lora_sync(cfg: JobConfig, backend: str | None = None) -> tuple[str | None, str | None]:
    """(model.lora.sync with `auto` decided, the reason it cannot run or None). An adapter goes to vLLM engines
    only; vLLM 0.32's CPU build serves no LoRA on mixture-of-experts models (its MoE LoRA kernels are Triton's)."""
    lora = cfg.model.lora
    if lora is None:
        return None, None
    backend = backend or resolve_backend(cfg)
    cpu_moe = backend == "vllm" and not _gpu(cfg.rollout.num_gpus) and _is_moe(cfg.model.policy)
    if lora.sync == "merged":
        return "merged", None
    if lora.sync == "auto":
        return ("merged" if backend != "vllm" or cpu_moe else "adapter"), None
    if backend != "vllm":
        return "adapter", ("model.lora.sync: adapter needs rollout.backend: vllm (the transformers engine takes full "
                           "weights); use model.lora.sync: merged or auto")
    if cpu_moe:
        return "adapter", (f"model.lora.sync: adapter on CPU engines cannot serve {cfg.model.policy}: vLLM's CPU build runs "
                           "LoRA on mixture-of-experts models only with Triton kernels, which it lacks; use "
                           "model.lora.sync: merged or auto")
    return "adapter", None


def plan_actors(cfg: JobConfig) -> ActorPlan:
    """The actors of online job `cfg` and their code paths; `problems` lists what cannot run."""
    r, srv, problems = cfg.rollout, cfg.servers, []
    tp = r.tensor_parallel_size
    rollout_gpu = _gpu(r.num_gpus)
    backend = resolve_backend(cfg)
    lora_sync, lora_problem = resolve_lora_sync(cfg, backend)
    if lora_problem:
        problems.append(lora_problem)
    if backend == "hf":
        if tp > 1:
            problems.append(f"rollout.tensor_parallel_size = {tp} needs rollout.backend: vllm "
                            "(the hf backend generates on one device)")
        if hf_engine_can_update(cfg.model.policy) is False:
            why = (f"cannot take weight updates for model.policy {cfg.model.policy} (its in-memory layout differs "
                   "from its checkpoint beyond names, e.g. fused experts)")
            if r.backend == "auto":  # auto would have picked vLLM: it is not installed
                problems.append(f"rollout.backend: auto finds no engine for model.policy: hf (transformers generate) "
                                f"{why}, and vLLM is not installed (install the [cpu] or [gpu] extra)")
            else:
                problems.append(f"rollout.backend: hf {why}; use rollout.backend: vllm")
        engine = f"transformers generate on {'cuda' if rollout_gpu else 'cpu'}"
        verify = "whole-tensor checksums"
    else:
        if rollout_gpu and tp > 1 and r.num_gpus != tp:
            problems.append(f"rollout.num_gpus = {r.num_gpus:g} must equal rollout.tensor_parallel_size = {tp}: "
                            "a worker reserves its engine's GPUs")
        device = "CUDA" if rollout_gpu else "CPU"
        engine = f"vLLM on {device}" + (f", tensor parallel {tp} (one process per rank)" if tp > 1 else "")
        verify = (f"per-shard checksums over {tp} ranks" if tp > 1 else "whole-tensor checksums") + (
            "" if rollout_gpu else ", CPU kernels read back")
        if lora_sync == "adapter":
            engine += f", serving the LoRA adapter (vLLM LoRA, max rank {vllm_max_lora_rank(cfg.model.lora.rank)})"
            verify = "the adapter read back from vLLM's LoRA layers, and a log-prob probe"
    where = f"; placed {r.placement}" + (f" on {dict(r.resources)}" if r.resources else "")
    if cfg.env.enabled:
        where += (f"; episodes of {cfg.env.class_spec} (up to {cfg.env.max_turns} turns, {cfg.max_total_tokens} tokens), "
                  + (f"environments in env-0 .. env-{cfg.env.num_workers - 1}" if cfg.env.num_workers else
                     f"environments in {cfg.env.processes_per_worker} child process(es) beside it"))
    actors = [ActorSpec(f"rollout-{i}", "rollout", r.num_cpus, r.num_gpus, f"{engine}; {verify}{where}")
              for i in range(r.num_workers)]

    roles = [("policy", cfg.trainer.policy)]
    if cfg.algorithm.name == "ppo":
        roles.append(("critic", cfg.trainer.critic))
    for role, rc in roles:
        stage = cfg.trainer.stage_for(rc.num_ranks)
        if cfg.trainer.offload != "none" and stage < (3 if cfg.trainer.offload == "all" else 1):
            problems.append(f"trainer.offload: {cfg.trainer.offload} needs trainer.zero_stage >= "
                            f"{3 if cfg.trainer.offload == 'all' else 1} (the {role} group runs ZeRO-{stage})")
        if 0 < rc.num_gpus < 1 or rc.num_gpus != int(rc.num_gpus):
            problems.append(f"trainer.{role}.num_gpus = {rc.num_gpus:g}: a rank needs whole GPUs "
                            "(ranks of one NCCL group cannot share a GPU)")
        path = _trainer_path(cfg, role, _gpu(rc.num_gpus), rc.num_ranks) + f"; placement group {rc.placement}" + (
            f" on {dict(rc.resources)}" if rc.resources else "")
        actors += [ActorSpec(f"{role}-{i}", role, rc.num_cpus, rc.num_gpus, path) for i in range(rc.num_ranks)]

    if cfg.algorithm.needs_reference and not lora_reference(cfg):  # no KL: no reference; LoRA: the policy serves it
        ref_device = "cuda" if _gpu(srv.reference_num_gpus) else "cpu"
        actors.append(ActorSpec("reference", "reference", srv.reference_num_cpus, srv.reference_num_gpus,
                                f"frozen {cfg.model.reference or cfg.model.policy} on {ref_device}, forward only"))
    kind = ("model " + str(cfg.model.reward)) if cfg.model.reward else (
        f"function {cfg.reward.function}" if cfg.reward.function else "HTTP endpoint")
    if cfg.reward.functions:
        kind = "functions " + " + ".join(f"{f.weight:g} x {f.function}" for f in cfg.reward.functions)
    reward_device = "cuda" if _gpu(srv.reward_num_gpus) else "cpu"
    has_reward = any((cfg.model.reward, cfg.reward.function, cfg.reward.functions, cfg.reward.url))
    actors += [ActorSpec(f"reward-{i}", "reward", srv.reward_num_cpus, srv.reward_num_gpus, f"{kind} on {reward_device}")
               for i in range(cfg.reward.num_workers if has_reward else 0)]
    env = cfg.env
    if env.enabled and env.num_workers:
        res = env.resources
        actors += [ActorSpec(f"env-{i}", "env", float(res.get("num_cpus", 1)), float(res.get("num_gpus", 0)),
                             f"{env.class_spec} environments, {env.processes_per_worker} host process(es)")
                   for i in range(env.num_workers)]

    if srv.colocate:
        actors = colocate(cfg, actors, problems)
    policy_gpu = _gpu(cfg.trainer.policy.num_gpus)
    if srv.weight_sync_backend == "collective":
        if policy_gpu != rollout_gpu:
            problems.append("servers.weight_sync_backend: collective broadcasts from policy rank 0's device, so "
                            "trainer.policy.num_gpus and rollout.num_gpus must both be 0 or both be > 0; use object_store")
        sync = f"collective: {'nccl' if policy_gpu else 'gloo'} broadcast from policy rank 0"
    else:
        sync = "object_store: buckets stored once in Ray's object store, read by every worker"
    if lora_sync == "adapter":
        sync += (f"; LoRA adapter only (rank {cfg.model.lora.rank}) into vLLM's LoRA slots, a new adapter per version, "
                 "verified by reading it back and by engine/trainer log-probs on a probe")
    elif lora_sync == "merged":
        sync += "; full weights with the LoRA adapter merged in"
    every = cfg.schedule.verify_sync_every
    sync += f"; verified at the first sync and every {every}" if every else "; not verified"
    k = cfg.schedule.max_staleness
    if k and cfg.algorithm.is_online:
        sync += (f"; asynchronous: samples up to {k} version(s) old, generated while the trainers train, "
                 f"reweighted by importance weights truncated at {cfg.algorithm.importance_cap:g}")
    return ActorPlan(actors, sync, problems)


def colocate(cfg: JobConfig, actors: list[ActorSpec], problems: list[str]) -> list[ActorSpec]:
    """servers.colocate: the reference and the reward-model servers each beside one policy rank, in that rank's
    placement-group bundle, which still reserves the rank's whole GPU (ranks of one group never share one)."""
    rc = cfg.trainer.policy
    ranks = [a for a in actors if a.role == "policy"]
    guests = [a for a in actors if a.role == "reference" or (a.role == "reward" and cfg.model.reward)]
    if not ranks:
        problems.append("servers.colocate puts servers beside the policy ranks: this job has no policy trainer group")
        return actors
    if len(guests) > len(ranks):
        problems.append(f"servers.colocate: {len(guests)} servers ({', '.join(a.name for a in guests)}) need as many "
                        f"policy ranks to sit beside; trainer.policy.num_ranks is {len(ranks)}")
        return actors
    if _gpu(rc.num_gpus):
        if rc.num_gpus != 1:
            problems.append(f"servers.colocate shares a policy rank's GPU: trainer.policy.num_gpus must be 1 (got {rc.num_gpus:g})")
            return actors
        for a in guests:
            key = "servers.reference_num_gpus" if a.role == "reference" else "servers.reward_num_gpus"
            if not 0 < a.num_gpus < 0.5:
                problems.append(f"{key} = {a.num_gpus:g}: beside a policy rank a server takes a fraction of that rank's "
                                "GPU, above 0 and below 0.5 (e.g. 0.25)")
                return actors
    elif any(_gpu(a.num_gpus) for a in guests):
        problems.append("servers.colocate: the policy ranks have no GPU (trainer.policy.num_gpus is 0), so the servers "
                        "beside them cannot have one; set servers.reference_num_gpus / reward_num_gpus to 0")
        return actors
    beside = {g.name: ranks[i].name for i, g in enumerate(guests)}
    return [replace(a, beside=beside[a.name], path=a.path + f"; beside {beside[a.name]}, in its bundle (servers.colocate)")
            if a.name in beside else a for a in actors]


def colocated_rank_gpus(plan: ActorPlan, rank_gpus: float) -> float:
    """What a policy rank asks Ray for when servers sit beside the ranks: its GPU less the largest server share
    (its bundle still holds the whole GPU)."""
    return rank_gpus - max((a.num_gpus for a in plan.actors if a.beside), default=0.0)


def check_plan(cfg: JobConfig) -> ActorPlan:
    """`plan_actors`, raising ConfigError (exit 2) naming the keys when the job cannot run as configured."""
    plan = plan_actors(cfg)
    if plan.problems:
        raise ConfigError("this job cannot run as configured:\n  " + "\n  ".join(plan.problems))
    return plan
