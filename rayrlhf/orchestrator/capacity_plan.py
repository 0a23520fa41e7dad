"""Does a job fit a cluster? Each actor's memory (capacity.py), placed on the nodes' GPUs, and when it does not
fit, the smallest config change that does, found by re-planning variants.

Placement follows what `System` asks Ray for (orchestrator/plan.py gives the actors and their GPUs):
rollout workers first, then the reference and reward servers, then each trainer group as a PACK
placement group (its ranks on as few nodes as possible). An actor with whole GPUs takes free GPUs of
one node; a fractional one shares a GPU with enough capacity left. On a shared GPU the estimates
add up, a vLLM engine counting its whole gpu_memory_utilization share.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from rayrlhf.config import JobConfig
from rayrlhf.errors import InvalidInput
from rayrlhf.orchestrator.capacity import (
    VLLM_DEFAULT_SEQS,
    Estimate,
    GiB,
    ModelShape,
    TrainerSetup,
    ceil_div,
    engine_estimate,
    host_trainer_bytes,
    model_shape,
    pass_rows,
    server_estimate,
    trainer_estimate,
)
from rayrlhf.orchestrator.plan import ActorPlan, ActorSpec, plan_actors

ALLOCATOR_MARGIN = 0.05  # share of a GPU kept free for the caching allocator's fragmentation (trainers, servers)


@dataclass(frozen=True)
class Node:
    gpus: int
    gpu_mem_gib: float
    host_mem_gib: float | None = None


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]

    @classmethod
    def parse(cls, spec: str) -> Cluster:
        """`nodes=N,gpus_per_node=G,gpu_mem_gib=M[,host_mem_gib=H]`, as `rayrlhf plan --cluster` takes it."""
        known = {"nodes", "gpus_per_node", "gpu_mem_gib", "host_mem_gib"}
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in known:
                raise InvalidInput(f"--cluster: {part!r} is not one of {sorted(known)} = a number")
            try:
                values[key] = float(value)
            except ValueError:
                raise InvalidInput(f"--cluster: {key}={value!r} is not a number") from None
        missing = sorted({"nodes", "gpus_per_node", "gpu_mem_gib"} - set(values))
        if missing:
            raise InvalidInput(f"--cluster needs {missing} (e.g. nodes=1,gpus_per_node=8,gpu_mem_gib=80)")
        if values["nodes"] < 1 or values["gpus_per_node"] < 0 or values["gpu_mem_gib"] <= 0:
            raise InvalidInput("--cluster: nodes >= 1, gpus_per_node >= 0 and gpu_mem_gib > 0")
        node = Node(int(values["gpus_per_node"]), values["gpu_mem_gib"], values.get("host_mem_gib"))
        return cls((node,) * int(values["nodes"]))

    @property
    def total_gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    def describe(self) -> str:
        kinds = {(n.gpus, n.gpu_mem_gib, n.host_mem_gib) for n in self.nodes}
        if len(kinds) == 1:
            g, m, h = kinds.pop()
            host = f", {h:g} GiB host memory each" if h else ""
            return f"{len(self.nodes)} node(s) x {g} GPUs of {m:g} GiB{host}"
        return ", ".join(f"node {i}: {n.gpus} GPUs of {n.gpu_mem_gib:g} GiB" for i, n in enumerate(self.nodes))


@dataclass
class ActorMemory:
    spec: ActorSpec
    estimate: Estimate | None  # per GPU (or, on CPU, the process); None: nothing worth counting (a function)
    host: float = 0.0  # host bytes beyond the process (ZeRO-Offload)
    where: str = "cpu"
    budget: float | None = None
    vllm: bool = False
    gpus: list[tuple[int, int]] = field(default_factory=list)  # (node, GPU index) it is placed on

    @property
    def headroom(self) -> float | None:
        return None if self.budget is None or self.estimate is None else self.budget - self.estimate.peak


@dataclass
class CapacityReport:
    cluster: Cluster
    actors: list[ActorMemory]
    problems: list[str]
    models: dict[str, ModelShape] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return not self.problems

    def table(self) -> str:
        lines = [f"cluster: {self.cluster.describe()}"]
        lines += [f"{key}: {shape.name} = {shape.describe()}" for key, shape in self.models.items()]
        lines.append(f"{'actor':<24}{'GPUs':>6}  {'placed on':<26}{'estimate':>10}{'budget':>10}{'headroom':>10}")
        for group in _groups(self.actors):
            a = group[0]
            name = a.spec.name if len(group) == 1 else f"{a.spec.name} .. {group[-1].spec.name}"
            where = _where(group)
            est = f"{a.estimate.gib():.1f}" if a.estimate else "-"
            budget = f"{a.budget / GiB:.1f}" if a.budget is not None else "-"
            head = f"{a.headroom / GiB:+.1f}" if a.headroom is not None else "-"
            lines.append(f"{name:<24}{a.spec.num_gpus:>6g}  {where:<26}{est:>10}{budget:>10}{head:>10}")
            if a.estimate is not None:
                lines.append(f"    {a.estimate.describe()}" + (f"; {a.estimate.note}" if a.estimate.note else ""))
        lines.append("(GiB per GPU; a vLLM engine's budget is its gpu_memory_utilization share)")
        lines.append("fits" if self.fits else "does NOT fit:\n  " + "\n  ".join(self.problems))
        return "\n".join(lines)


def _where(group: list[ActorMemory]) -> str:
    """"node 0 GPU 3", "node 1 GPUs 0-7", "cpu"; a group's GPUs per node."""
    if len(group) == 1 or not all(a.gpus for a in group):
        return group[0].where if len(group) == 1 else ("cpu" if all(a.where == "cpu" for a in group) else "mixed")
    by_node: dict[int, list[int]] = {}
    for a in group:
        for node, index in a.gpus:
            by_node.setdefault(node, []).append(index)
    return ", ".join(f"node {n} GPU{'s' if len(ix) > 1 else ''} {_span(ix)}" for n, ix in by_node.items())


def _span(ix: list[int]) -> str:
    ix = sorted(set(ix))
    return f"{ix[0]}-{ix[-1]}" if ix == list(range(ix[0], ix[-1] + 1)) and len(ix) > 1 else ",".join(map(str, ix))


def _groups(actors: list[ActorMemory]) -> list[list[ActorMemory]]:
    out: list[list[ActorMemory]] = []
    for a in actors:
        prev = out[-1][0] if out else None
        if prev and prev.spec.role == a.spec.role and prev.spec.num_gpus == a.spec.num_gpus and \
                (prev.estimate and prev.estimate.peak) == (a.estimate and a.estimate.peak):
            out[-1].append(a)
        else:
            out.append([a])
    return out


# ---------------------------------------------------------------- estimates from a job

def _bytes(dtype: str, gpu: bool) -> int:
    return (2 if gpu else 4) if dtype == "auto" else (4 if dtype == "float32" else 2)


def trainer_setup(cfg: JobConfig, role: str, gpu: bool) -> TrainerSetup:
    t = cfg.trainer
    rc = t.critic if role == "critic" else t.policy
    mini = t.mini_batch_size or cfg.samples_per_step
    width = cfg.max_total_tokens if cfg.env.enabled else cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    rows, passes = pass_rows(mini // rc.num_ranks, width, t.micro_batch_size, t.micro_batch_tokens)
    bf16 = t.bf16 if t.bf16 is not None else gpu
    lora = cfg.model.lora if role != "critic" else None  # the critic trains whole (actors/trainer_group.py)
    targets = None if lora is None or isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    return TrainerSetup(ranks=rc.num_ranks, stage=t.stage_for(rc.num_ranks), d=2 if bf16 else 4, rows=rows, width=width,
                        response=width - cfg.data.max_prompt_tokens, passes=passes, checkpointing=t.gradient_checkpointing,
                        logits=role == "policy", cuda=gpu, offload=t.offload, lora_rank=lora.rank if lora else 0,
                        lora_targets=targets)


def rollout_sequences(cfg: JobConfig) -> int:
    """Sequences one engine decodes at once: its share of a step's samples, capped by max_num_seqs."""
    r = cfg.rollout
    share = ceil_div(cfg.samples_per_step * (1 + cfg.schedule.max_staleness), r.num_workers)
    return min(share, r.max_num_seqs or VLLM_DEFAULT_SEQS)


def actor_estimates(cfg: JobConfig, plan: ActorPlan,
                    shapes: dict[str, ModelShape] | None = None) -> tuple[list[ActorMemory], dict[str, ModelShape]]:
    """Each actor of `plan` with its memory; `shapes` caches config.json reads between variants."""
    cache = shapes if shapes is not None else {}

    def shape(name: str) -> ModelShape:
        if name not in cache:
            cache[name] = model_shape(name)
        return cache[name]

    r, m, srv = cfg.rollout, cfg.model, cfg.servers
    # a sample's longest sequence: prompt + response, or a multi-turn episode's whole conversation
    width = cfg.max_total_tokens if cfg.env.enabled else cfg.data.max_prompt_tokens + r.max_new_tokens
    used: dict[str, ModelShape] = {}
    out = []
    for spec in plan.actors:
        gpu = spec.num_gpus > 0
        host = 0.0
        if spec.role == "rollout":
            used["model.policy"] = s = shape(m.policy)
            d = _bytes(r.dtype if r.dtype != "auto" else m.dtype, gpu)
            vllm = "vLLM" in spec.path
            est = engine_estimate(s, d, r.tensor_parallel_size if gpu else 1, rollout_sequences(cfg),
                                  r.max_model_len or width, r.gpu_memory_utilization if vllm and gpu else 1.0,
                                  cuda_graphs=vllm and not r.enforce_eager, cuda=gpu)
            out.append(ActorMemory(spec, est, vllm=vllm and gpu))
            continue
        if spec.role in ("policy", "critic"):
            key = "model.policy" if spec.role == "policy" else "model.critic"
            used[key] = s = shape(m.policy if spec.role == "policy" else str(m.critic))
            setup = trainer_setup(cfg, spec.role, gpu)
            est = trainer_estimate(s, setup)
            host = host_trainer_bytes(setup.trainable(s), setup)
        elif spec.role == "reference":
            used["model.reference"] = s = shape(m.reference or m.policy)
            est = server_estimate(s, _bytes(m.dtype, gpu), srv.micro_batch_size, width, r.max_new_tokens, True, gpu)
        elif m.reward:
            used["model.reward"] = s = shape(m.reward)
            est = server_estimate(s, _bytes(m.dtype, gpu), srv.micro_batch_size, width, r.max_new_tokens, False, gpu)
        else:
            est = None
        out.append(ActorMemory(spec, est, host=host))
    return out, used


# ---------------------------------------------------------------- placement

@dataclass
class _Gpu:
    node: int
    index: int
    free: float = 1.0
    used: float = 0.0  # bytes counted against this GPU by the actors on it


def place(actors: list[ActorMemory], cluster: Cluster) -> list[str]:
    """Assign GPUs in creation order and check each GPU's memory; returns the problems."""
    gpus = [[_Gpu(n, i) for i in range(node.gpus)] for n, node in enumerate(cluster.nodes)]
    problems: list[str] = []
    short: list[str] = []
    guests: dict[str, list[ActorMemory]] = {}  # servers.colocate: policy rank -> the servers in its bundle
    for a in actors:
        if a.spec.beside:
            guests.setdefault(a.spec.beside, []).append(a)
    order = sorted([a for a in actors if not a.spec.beside],
                   key=lambda a: ["rollout", "reference", "reward", "policy", "critic"].index(a.spec.role))
    group_node: dict[str, int] = {}
    for a in order:
        g = a.spec.num_gpus
        if g <= 0:
            continue
        chosen = _choose(gpus, g, group_node.get(a.spec.role) if a.spec.role in ("policy", "critic") else None)
        if chosen is None:
            short.append(a.spec.name)
            a.where = "no room"
            continue
        if a.spec.role in ("policy", "critic"):
            group_node[a.spec.role] = chosen[0].node
        share = min(g, 1.0)
        for gpu in chosen:
            gpu.free -= share
        node = chosen[0].node
        a.gpus = [(gpu.node, gpu.index) for gpu in chosen]
        a.where = f"node {node} GPU{'s' if len(chosen) > 1 else ''} {_span([gpu.index for gpu in chosen])}"
        mem = cluster.nodes[node].gpu_mem_gib * GiB
        need = a.estimate.peak if a.estimate else 0.0
        reserve = a.estimate.budget_share * mem if a.vllm and a.estimate and a.estimate.budget_share else None
        others = max(gpu.used for gpu in chosen)
        if reserve is not None:
            a.budget = min(reserve, mem - others)
            for gpu in chosen:
                gpu.used += reserve
        else:
            a.budget = mem * (1 - ALLOCATOR_MARGIN) - others
            for gpu in chosen:
                gpu.used += need
        for guest in guests.get(a.spec.name, []):  # one GPU, memory for both: each budget leaves room for the other
            guest_need = guest.estimate.peak if guest.estimate else 0.0
            guest.gpus, guest.where = list(a.gpus), f"{a.where} (beside {a.spec.name})"
            guest.budget = mem * (1 - ALLOCATOR_MARGIN) - max(gpu.used for gpu in chosen)
            a.budget -= guest_need
            for gpu in chosen:
                gpu.used += guest_need
    if short:
        needed = sum(a.spec.num_gpus for a in actors if not a.spec.beside)
        problems.append(f"no GPU left for {_names(short)}: the plan asks for {needed:g} GPUs "
                        f"({_gpu_summary(actors)}), the cluster has {cluster.total_gpus}")
    for group in _groups([a for a in actors if a.budget is not None]):
        a = group[0]
        if a.headroom is not None and a.headroom < 0:
            problems.append(_short_message(group))
    problems += _host_problems(actors, cluster)
    return problems


def _short_message(group: list[ActorMemory]) -> str:
    a = group[0]
    assert a.estimate is not None and a.budget is not None
    kind = "of its gpu_memory_utilization share" if a.vllm else "of GPU memory"
    return (f"{_names([g.spec.name for g in group])} need{'s' if len(group) == 1 else ''} {a.estimate.gib():.1f} GiB per GPU, "
            f"{a.budget / GiB:.1f} GiB {kind} is available: {(a.estimate.peak - a.budget) / GiB:.1f} GiB short "
            f"({a.estimate.describe()})")


def _host_problems(actors: list[ActorMemory], cluster: Cluster) -> list[str]:
    """ZeRO-Offload's host memory per node (where its ranks are placed), then everything on the host in total."""
    host = [n.host_mem_gib for n in cluster.nodes]
    if any(h is None for h in host):
        return []
    out = []
    for n, gib in enumerate(host):
        on_node = [a for a in actors if a.gpus and a.gpus[0][0] == n]
        need = sum(a.host for a in on_node)
        if need > (gib or 0) * GiB:
            out.append(f"host memory of node {n}: ZeRO-Offload of {_names([a.spec.name for a in on_node if a.host])} "
                       f"needs {need / GiB:.1f} GiB, the node has {gib:g} GiB")
    need = sum(a.host for a in actors) + sum(a.estimate.peak for a in actors if a.spec.num_gpus == 0 and a.estimate)
    total = sum(h for h in host if h) * GiB
    if need > total:
        out.append(f"host memory: the CPU actors and ZeRO-Offload need {need / GiB:.1f} GiB, the nodes have "
                   f"{total / GiB:.1f} GiB")
    return out


def _choose(gpus: list[list[_Gpu]], g: float, prefer: int | None) -> list[_Gpu] | None:
    nodes = sorted(range(len(gpus)), key=lambda n: (n != prefer, n))
    if g < 1:
        for n in nodes:  # best fit: the GPU with the least capacity that still fits
            fitting = [x for x in gpus[n] if x.free >= g - 1e-9]
            if fitting:
                return [min(fitting, key=lambda x: x.free)]
        return None
    whole = int(g)
    for n in nodes:
        free = [x for x in gpus[n] if x.free >= 1 - 1e-9]
        if len(free) >= whole:
            return free[:whole]
    return None


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} actors)"


def _gpu_summary(actors: list[ActorMemory]) -> str:
    by_role: dict[str, float] = {}
    for a in actors:
        if not a.spec.beside:  # a server beside a policy rank is inside the rank's GPU
            by_role[a.spec.role] = by_role.get(a.spec.role, 0.0) + a.spec.num_gpus
    return ", ".join(f"{role} {n:g}" for role, n in by_role.items() if n)


def check_capacity(cfg: JobConfig, cluster: Cluster, shapes: dict[str, ModelShape] | None = None) -> CapacityReport:
    """Estimate, place and check every actor of online job `cfg` on `cluster`."""
    plan = plan_actors(cfg)
    actors, used = actor_estimates(cfg, plan, shapes)
    problems = list(plan.problems) + place(actors, cluster)
    return CapacityReport(cluster, actors, problems, used)


# ---------------------------------------------------------------- the smallest change that fits

def _with(cfg: JobConfig, overrides: dict[str, Any]) -> JobConfig | None:
    """`cfg` with dotted-key overrides, validated again (None when the variant is not a valid job)."""
    data = cfg.model_dump()
    for key, value in overrides.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    try:
        return JobConfig.model_validate(data)
    except ValueError:
        return None


def _halvings(value: int, floor: int = 1) -> list[int]:
    out = []
    while value // 2 >= floor and value > floor:
        value //= 2
        out.append(value)
    return out


def candidate_changes(cfg: JobConfig, report: CapacityReport) -> list[dict[str, Any]]:
    """Single-knob changes aimed at what does not fit, cheapest first (what they cost in speed or the objective)."""
    failing = {a.spec.role for a in report.actors if a.headroom is not None and a.headroom < 0}
    no_room = any(a.where == "no room" for a in report.actors)
    t, r, s = cfg.trainer, cfg.rollout, cfg.servers
    out: list[dict[str, Any]] = []
    roles = [(role, t.critic if role == "critic" else t.policy) for role in ("policy", "critic") if role in failing]
    if roles:  # the trainer section is shared by both groups; ranks are per group (all failing groups at once)
        if not t.gradient_checkpointing:
            out.append({"trainer.gradient_checkpointing": True})
        stage = min(t.stage_for(rc.num_ranks) for _, rc in roles)
        out += [{"trainer.zero_stage": z} for z in range(stage + 1, 4)]
        rows = max(trainer_setup(cfg, role, rc.num_gpus > 0).rows for role, rc in roles)
        out += [{"trainer.micro_batch_size": b} for b in _halvings(rows)]
        out += [{f"trainer.{role}.num_ranks": rc.num_ranks * k for role, rc in roles} for k in (2, 4, 8)]
        if t.offload == "none":
            out.append({"trainer.offload": "optimizer"} if stage else {"trainer.offload": "optimizer", "trainer.zero_stage": 2})
        if t.offload != "all":
            out.append({"trainer.offload": "all", "trainer.zero_stage": 3})
    if "rollout" in failing:
        out += [{"rollout.max_num_seqs": n} for n in _halvings(rollout_sequences(cfg))]
        out += [{"rollout.gpu_memory_utilization": u} for u in (0.85, 0.9, 0.95) if u > r.gpu_memory_utilization]
        out += [{"rollout.tensor_parallel_size": tp, "rollout.num_gpus": tp}
                for tp in (2 * r.tensor_parallel_size, 4 * r.tensor_parallel_size)]
        if not r.enforce_eager:
            out.append({"rollout.enforce_eager": True})
    if failing & {"reference", "reward"}:
        out += [{"servers.micro_batch_size": b} for b in _halvings(s.micro_batch_size)]
    if no_room and not s.colocate and t.policy.num_gpus == 1:  # the frozen servers give up their GPUs
        on_gpu = {a.spec.role for a in report.actors if a.spec.num_gpus >= 1}
        change: dict[str, Any] = {}
        if "reference" in on_gpu:
            change["servers.reference_num_gpus"] = 0.25
        if "reward" in on_gpu and cfg.model.reward:
            change["servers.reward_num_gpus"] = 0.25
        if change:
            out.append({"servers.colocate": True, **change})
    if no_room or roles:  # more ranks may need GPUs that rollout workers or servers can give up
        out += [{"rollout.num_workers": n} for n in range(r.num_workers - 1, 0, -1)]
        if s.reference_num_gpus >= 1 and s.reward_num_gpus >= 1:
            out.append({"servers.reference_num_gpus": 0.5, "servers.reward_num_gpus": 0.5})
    if no_room:
        for role, rc in (("policy", t.policy), ("critic", t.critic)):
            out += [{f"trainer.{role}.num_ranks": n} for n in _halvings(rc.num_ranks)]
    if "reference" in failing or no_room:
        out.append({"algorithm.kl_coef": 0.0})  # no KL term, no reference server: changes the objective
    return out


@dataclass
class Suggestion:
    overrides: dict[str, Any]
    report: CapacityReport

    def describe(self) -> str:
        sets = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.overrides.items())
        tight = min((a.headroom for a in self.report.actors if a.headroom is not None), default=None)
        return sets + (f"  (then the tightest actor has {tight / GiB:.1f} GiB to spare)" if tight is not None else "")


def smallest_fix(cfg: JobConfig, cluster: Cluster, report: CapacityReport,
                 shapes: dict[str, ModelShape] | None = None, max_pairs: int = 200) -> Suggestion | None:
    """Re-plan each single change (cheapest first), then pairs of them; the first variant that fits."""
    singles = candidate_changes(cfg, report)
    tried: list[tuple[dict[str, Any], CapacityReport]] = []
    for change in singles:
        variant = _with(cfg, change)
        if variant is None:
            continue
        rep = check_capacity(variant, cluster, shapes)
        if rep.fits:
            return Suggestion(change, rep)
        tried.append((change, rep))
    pairs = sorted(itertools.combinations(range(len(singles)), 2), key=lambda ij: (sum(ij), ij))
    for i, j in pairs[:max_pairs]:
        a, b = singles[i], singles[j]
        if set(a) & set(b):
            continue
        change = {**a, **b}
        variant = _with(cfg, change)
        if variant is None:
            continue
        rep = check_capacity(variant, cluster, shapes)
        if rep.fits:
            return Suggestion(change, rep)
    return None


# ---------------------------------------------------------------- CPU-valued keys on a GPU cluster

def cpu_valued_warnings(cfg: JobConfig, cluster_resources: dict[str, float]) -> list[str]:
    """The keys still at their CPU values while the cluster has GPUs (the local-cpu configs' defaults)."""
    gpus = cluster_resources.get("GPU", 0)
    if not gpus:
        return []
    r, t, s = cfg.rollout, cfg.trainer, cfg.servers
    out = []
    where = f"the cluster has {gpus:g} GPUs"
    if r.num_gpus == 0:
        out.append(f"rollout.num_gpus is 0: the rollout engines generate on CPU although {where} "
                   "(set it to rollout.tensor_parallel_size)")
    elif r.gpu_memory_utilization <= 0.2:
        out.append(f"rollout.gpu_memory_utilization is {r.gpu_memory_utilization:g}, the CPU default: vLLM keeps only "
                   "that share of each GPU for weights and KV cache (0.85-0.9 when the GPU is the engine's alone)")
    if r.num_gpus > 0 and r.enforce_eager:
        out.append("rollout.enforce_eager is true (the CPU default): no CUDA graphs, slower decoding; false for long runs")
    roles = [("policy", t.policy)] + ([("critic", t.critic)] if cfg.algorithm.name == "ppo" else [])
    out += [f"trainer.{role}.num_gpus is 0: the {role} trains on CPU although {where}" for role, rc in roles
            if rc.num_gpus == 0]
    if cfg.algorithm.is_online and cfg.algorithm.needs_reference and s.reference_num_gpus == 0:
        out.append(f"servers.reference_num_gpus is 0: the reference scores on CPU although {where}")
    if cfg.model.reward and s.reward_num_gpus == 0:
        out.append(f"servers.reward_num_gpus is 0: the reward model scores on CPU although {where}")
    return out


def cluster_from_nodes(nodes: list[dict[str, Any]], gpu_mem_gib: dict[str, float]) -> Cluster:
    """The cluster `ray.nodes()` describes: alive nodes with GPUs, each with the GPU memory probed on it
    (`gpu_mem_gib` by NodeID) and the host memory Ray manages there."""
    out = []
    for node in nodes:
        res = node.get("Resources", {})
        gpus = int(res.get("GPU", 0))
        if not node.get("Alive", True) or gpus == 0 or node.get("NodeID") not in gpu_mem_gib:
            continue
        host = res.get("memory")
        out.append(Node(gpus, gpu_mem_gib[node["NodeID"]], host / GiB if host else None))
    return Cluster(tuple(out))
