"""How much memory each actor of a job needs, from the models' config.json alone (no weights loaded).

Pure arithmetic over a model's shape (`ModelShape`), so a plan for a 72B model on 512 GPUs is
checked on a laptop in a second. `capacity_plan.py` places the actors on a cluster with these
figures; docs/design.md ("Capacity planning") states the formulas and what they leave out.
Every figure is bytes. `d` is the bytes of one element in the compute dtype (2 bf16, 4 fp32).

Trainer rank (DeepSpeed ZeRO stage s over R ranks, N parameters, AdamW):
  weights N·d (÷R at s=3, plus up to 1e9 gathered parameters: `zero3_gathered_params`); fp32
  master copy 4N (÷R at s≥1; none at s=0 in fp32); Adam m and v 8N (÷R at s≥1); gradients N·d
  (÷R at s≥2); the reduce bucket ZeRO 1-3 allocate (5e8 elements, reserved whole on a GPU,
  touched only up to N on CPU); the step's temporaries (s=0: the flattened all-reduce copy of the
  gradients, and in bf16 their fp32 copy; s=1,2: the fp32 gradient partition; s=3: that of one
  1e9-element sub-group). ZeRO-Offload moves master, m, v (and at s≥2 the gradient partition) to
  the host. Activations per token per decoder layer: `layer_activation_bytes`; with gradient
  checkpointing only each layer's input (h·d) is kept and one layer is recomputed at a time. The
  policy's logits (rows·T·V·d, and their gradient in backward) plus the float32 work of one
  log-softmax block (models/forward.py recomputes each block in backward: `logits_bytes`).
  Peak = max(forward/backward, optimizer step), each the sum of what is alive then.
vLLM engine (per GPU of tensor parallel size TP): weights N·d/TP, KV cache layers·2·kv_heads/TP
  ·head_dim·d per token for the sequences decoded at once, a profile-run activation reserve, the
  non-torch memory and CUDA graphs; all inside gpu_memory_utilization x GPU memory.
Reference / reward server: weights and one forward micro-batch (no autograd).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayrlhf.errors import InvalidInput

GiB = 1024**3
REDUCE_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size / allreduce bucket default, elements
MAX_LIVE_PARAMETERS = 1_000_000_000  # ZeRO-3's stage3_max_live_parameters / max_reuse_distance defaults, elements
SUB_GROUP = 1_000_000_000  # ZeRO-3's sub_group_size default: elements of fp32 partition stepped at once
LOGPROB_BLOCK = 1 << 24  # models/forward.py's _BLOCK_ELEMENTS: float32 elements per log-softmax block
CUDA_CONTEXT = GiB  # per GPU process: CUDA context, cuBLAS workspace, NCCL buffers (outside torch's count)
CUDA_GRAPHS = GiB // 2  # vLLM's captured CUDA graphs (rollout.enforce_eager false)
VLLM_BATCHED_TOKENS = 8192  # tokens of vLLM's profiling forward (max_num_batched_tokens default)
VLLM_DEFAULT_SEQS = 256  # vLLM's max_num_seqs default


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that memory depends on (Hugging Face config names in comments)."""

    model_type: str
    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim, else hidden_size / num_attention_heads
    intermediate: int  # intermediate_size (dense MLP)
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings
    qkv_bias: bool = False
    o_bias: bool = False
    norms_per_layer: int = 2  # RMSNorms per decoder layer (Gemma 2/3: 4)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma 3)
    experts: int = 0  # routed experts per MoE layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    moe_layers: int = 0  # how many of the layers are MoE layers
    softcap: bool = False  # final logit soft-capping (Gemma 2)
    name: str = ""

    @classmethod
    def from_config(cls, c: dict[str, Any], name: str = "") -> ModelShape:
        """The shape of a config.json dict (text_config for multimodal wrappers); InvalidInput if it is not a
        decoder transformer with standard attention."""
        if "hidden_size" not in c and isinstance(c.get("text_config"), dict):
            c = c["text_config"]
        mtype = str(c.get("model_type", ""))
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if not c.get(k)]
        if missing:
            raise InvalidInput(f"{name or 'model'}: config.json lacks {missing}: not a decoder transformer the planner knows")
        if c.get("kv_lora_rank"):
            raise InvalidInput(f"{name}: model_type {mtype} uses multi-head latent attention, which the planner does not model")
        h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        layers = int(c["num_hidden_layers"])
        experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
        moe_layers = 0
        if experts:
            step = int(c.get("decoder_sparse_step") or 1)
            dense = set(c.get("mlp_only_layers") or [])
            moe_layers = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)
        return cls(
            model_type=mtype, hidden=h, layers=layers, heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or h // heads),
            intermediate=int(c.get("intermediate_size") or 4 * h),
            vocab=int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=mtype.startswith("qwen2") or bool(c.get("attention_bias")),
            o_bias=bool(c.get("attention_bias")),
            norms_per_layer=4 if mtype.startswith("gemma2") or mtype.startswith("gemma3") else 2,
            qk_norm=mtype.startswith(("qwen3", "gemma3", "olmo2")),
            experts=experts,
            experts_per_token=int(c.get("num_experts_per_tok") or 0),
            expert_intermediate=int(c.get("moe_intermediate_size") or c.get("intermediate_size") or 0) if experts else 0,
            shared_expert_intermediate=int(c.get("shared_expert_intermediate_size") or 0),
            moe_layers=moe_layers,
            softcap=bool(c.get("final_logit_softcapping")),
            name=name,
        )

    # ------------------------------------------------------------ parameters
    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def attention_params(self) -> int:
        h, q, kv = self.hidden, self.q_width, self.kv_width
        n = h * q + 2 * h * kv + q * h
        n += (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        return n + 2 * self.head_dim * self.qk_norm

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def moe_mlp_params(self) -> int:
        h = self.hidden
        n = self.experts * 3 * h * self.expert_intermediate + h * self.experts  # experts + router
        if self.shared_expert_intermediate:
            n += 3 * h * self.shared_expert_intermediate + h  # shared expert and its gate
        return n

    def layer_params(self, moe: bool = False) -> int:
        mlp = self.moe_mlp_params() if moe else self.dense_mlp_params()
        return self.attention_params() + mlp + self.norms_per_layer * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def num_params(self) -> int:
        """Every parameter, a tied embedding once (what `sum(p.numel())` counts)."""
        layers = self.moe_layers * self.layer_params(True) + (self.layers - self.moe_layers) * self.layer_params(False)
        return layers + self.embedding_params * (1 if self.tied else 2) + self.hidden

    def lora_params(self, rank: int, targets: tuple[str, ...] | None = None) -> int:
        """Parameters of a LoRA adapter of `rank` (A and B of each targeted linear layer: rank·(in + out)).
        `targets` None is all-linear: every decoder linear layer but the routed experts (fused 3-D weights,
        which peft leaves frozen); names the planner does not know count as all-linear (an upper bound)."""
        h, q, kv, r = self.hidden, self.q_width, self.kv_width, rank

        def mlp(width: int) -> dict[str, int]:
            return {"gate_proj": r * (h + width), "up_proj": r * (h + width), "down_proj": r * (width + h),
                    "gate_up_proj": r * (h + 2 * width)}

        attention = {"q_proj": r * (h + q), "k_proj": r * (h + kv), "v_proj": r * (h + kv), "o_proj": r * (q + h),
                     "qkv_proj": r * (h + q + 2 * kv)}
        dense, shared = mlp(self.intermediate), mlp(self.shared_expert_intermediate)
        full = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        names = full if targets is None or not set(targets) <= {*attention, *dense} else targets

        def layer(moe: bool) -> int:
            widths = (shared if self.shared_expert_intermediate else {}) if moe else dense
            return sum(attention.get(name, 0) + widths.get(name, 0) for name in names)

        return self.moe_layers * layer(True) + (self.layers - self.moe_layers) * layer(False)

    @property
    def zero3_gathered_params(self) -> int:
        """Parameters a ZeRO-3 rank holds gathered: DeepSpeed keeps a gathered parameter until its reuse when
        that comes within stage3_max_reuse_distance (1e9 elements), so up to 1e9 stay live between forward and
        backward (all of a smaller model); at least the largest module (an embedding, or two prefetched layers)."""
        module = max(self.embedding_params, 2 * self.layer_params(self.moe_layers > 0))
        return max(min(self.num_params, MAX_LIVE_PARAMETERS), module)

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        """KV cache per token on one GPU of a tensor-parallel group (kv heads replicate when TP exceeds them)."""
        return self.layers * 2 * max(1, self.kv_heads // tp) * self.head_dim * dtype_bytes

    def describe(self) -> str:
        moe = (f", MoE {self.experts} experts top-{self.experts_per_token} in {self.moe_layers} layers"
               if self.experts else "")
        n = self.num_params
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        return (f"{self.model_type} {size} params: {self.layers} layers, hidden {self.hidden}, "
                f"{self.heads} heads / {self.kv_heads} kv heads x {self.head_dim}, MLP {self.intermediate}, "
                f"vocab {self.vocab}{', tied' if self.tied else ''}{moe}")


# ---------------------------------------------------------------- activations

def _norm_bytes(width: int, d: int) -> int:
    """An RMSNorm (HF computes it in fp32) keeps its fp32 input, its normalised value and its output."""
    return (4 + 2 * d) * width


def layer_activation_bytes(s: ModelShape, d: int, moe: bool = False) -> int:
    """Bytes autograd keeps per token for one decoder layer in training.

    norms: (4 + 2d)·h each; attention: q, k and v (k/v repeated to every head, as transformers does
    whenever a padding mask is passed), the SDPA output and o_proj's input, 5·heads·head_dim·d, plus
    the fp32 log-sum-exp per head; q/k norms on their widths; a gated MLP keeps gate, act(gate), up
    and their product, 4·I·d; an MoE layer the router's logits and probabilities and, per routed
    copy of the token, its gathered input, the expert's 4·I_e and its output, plus a shared expert.
    Attention is O(L) (SDPA's flash / memory-efficient kernels): the L x L mask is `mask_bytes`.
    """
    h, q, kv = s.hidden, s.q_width, s.kv_width
    n = s.norms_per_layer * _norm_bytes(h, d) + 5 * q * d + 4 * s.heads
    if s.qk_norm:
        n += _norm_bytes(q + kv, d)
    if moe:
        n += s.experts * (4 + d) + s.experts_per_token * (2 * h + 4 * s.expert_intermediate) * d
        n += 4 * s.shared_expert_intermediate * d
    else:
        n += 4 * s.intermediate * d
    return n


def mean_layer_activation_bytes(s: ModelShape, d: int) -> float:
    return (s.moe_layers * layer_activation_bytes(s, d, True)
            + (s.layers - s.moe_layers) * layer_activation_bytes(s, d, False)) / s.layers


def forward_working_bytes(s: ModelShape, d: int) -> int:
    """Per token, the most a no-grad forward holds at once inside a layer: residual, normed input, q/k/v and
    output, or the MLP's gate, up and product (MoE: per routed copy)."""
    mlp = s.experts_per_token * s.expert_intermediate + s.shared_expert_intermediate if s.experts else s.intermediate
    return (4 * s.hidden + max(3 * s.q_width + 2 * s.kv_width, 3 * mlp)) * d


def mask_bytes(rows: int, width: int, d: int) -> int:
    """A padded batch's boolean L x L mask, which SDPA turns into an additive bias kept for backward."""
    return rows * width * width * d


def logits_bytes(s: ModelShape, rows: int, response: int, d: int, training: bool) -> int:
    """The policy's logits for `response` positions per row and `token_logprobs`' float32 work.

    The model's logits over the last T + 1 positions stay in the model dtype; the float32 log-softmax is
    done in blocks of at most LOGPROB_BLOCK values and, in training, recomputed in backward
    (`forward._ChunkedLogprobs`): backward adds the gradient buffer of the logits' size in the model dtype.
    Both passes add three float32 [block, V] temporaries. Soft-capping keeps one more logits-sized tensor.
    """
    logits = d * rows * (response + 1) * s.vocab
    chunk = 3 * min(rows * response, max(1, LOGPROB_BLOCK // s.vocab)) * s.vocab * 4
    capped = logits if s.softcap else 0
    return (2 * logits if training else logits) + chunk + capped


# ---------------------------------------------------------------- estimates

@dataclass
class Estimate:
    """One actor's memory on one of its devices: named terms and the peak they add up to."""

    terms: dict[str, float]
    peak: float
    phases: dict[str, float] = field(default_factory=dict)
    budget_share: float | None = None  # vLLM: the share of each GPU the engine reserves (gpu_memory_utilization)
    note: str = ""

    def gib(self) -> float:
        return self.peak / GiB

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.terms.items() if v >= 0.005 * GiB)
        return f"{self.peak / GiB:.2f} GiB = max({', '.join(self.phases)}) of [{parts}]"


@dataclass(frozen=True)
class TrainerSetup:
    """What a trainer rank's memory depends on besides the model."""

    ranks: int
    stage: int
    d: int  # bytes per element of the compute dtype
    rows: int  # rows per forward/backward pass
    width: int  # padded prompt + response length
    response: int  # response positions (the log-prob part)
    passes: int  # passes per optimizer step (gradient accumulation)
    checkpointing: bool
    logits: bool  # the policy computes log-probs; a critic / reward model reads a 1-wide head
    cuda: bool  # GPU: buffers count whole, plus the CUDA context
    offload: str = "none"  # none | optimizer | all: ZeRO-Offload to host memory
    lora_rank: int = 0  # model.lora on this model: only the adapter has gradients and optimizer state
    lora_targets: tuple[str, ...] | None = None  # None: all-linear

    def trainable(self, s: ModelShape) -> int:
        """Parameters with gradients and optimizer state: the whole model, or its LoRA adapter."""
        return s.lora_params(self.lora_rank, self.lora_targets) if self.lora_rank else s.num_params


def zero_state(n: int, s: ModelShape | None, t: TrainerSetup, trainable: int | None = None) -> dict[str, float]:
    """Weights, master copy, Adam states, gradients and ZeRO buffers on one rank (bytes), by stage. `trainable`
    (default: all `n`) is what has gradients and optimizer state; with LoRA the adapter's weights add to `n`."""
    r, st, d = t.ranks, t.stage, t.d
    lora = trainable is not None and trainable != n
    weights = n + trainable if lora else n
    n = n if trainable is None else trainable

    def part(x: float) -> float:
        return x / r

    bucket = (REDUCE_BUCKET if t.cuda else min(REDUCE_BUCKET, n)) * d
    out: dict[str, float] = {}
    out["weights"] = weights * d if st < 3 else part(weights * d)
    if st == 3 and s is not None:
        out["gathered weights"] = s.zero3_gathered_params * d
    if st == 0:
        out["master fp32"] = 4 * n if d != 4 else 0
        out["adam m+v"] = 8 * n
    else:
        out["master fp32"] = part(4 * n)
        out["adam m+v"] = part(8 * n)
    out["grads"] = n * d if st < 2 else part(n * d)
    out["reduce bucket"] = bucket if st > 0 else 0
    if t.offload in ("optimizer", "all"):
        out["master fp32"] = out["adam m+v"] = 0  # on the host (see host_trainer_bytes)
        if st >= 2:
            out["grads"] = 0  # the gradient partition goes to the host too; only the reduce bucket stays
    if t.offload == "all" and st == 3:
        out["weights"] = 0
    return out


def step_temporaries(n: int, t: TrainerSetup) -> float:
    """What the optimizer step allocates beside the states: ZeRO-0 all-reduces a flattened copy of the gradients
    (and in bf16 converts them to fp32 for the master weights); ZeRO 1-3 build the fp32 gradient partition."""
    if t.stage == 0:
        return min(n, REDUCE_BUCKET) * t.d + (4 * n if t.d != 4 else 0)
    if t.offload != "none":
        return 0
    return 4 * (min(n / t.ranks, SUB_GROUP) if t.stage == 3 else n / t.ranks)  # ZeRO-3 steps sub-group by sub-group


def host_trainer_bytes(n: int, t: TrainerSetup) -> float:
    """Host memory a rank's ZeRO-Offload needs: master, m and v (and the fp32 gradient partition)."""
    if t.offload == "none":
        return 0.0
    return (4 + 8 + 4) * n / (t.ranks if t.stage > 0 else 1) + (n * t.d / t.ranks if t.offload == "all" else 0)


def trainer_estimate(s: ModelShape, t: TrainerSetup) -> Estimate:
    """Peak memory of one trainer rank over one optimizer step in steady state (after the first step)."""
    n, d = t.trainable(s), t.d
    state = zero_state(s.num_params, s, t, trainable=n)
    tokens = t.rows * t.width
    layer = mean_layer_activation_bytes(s, d)
    final_norm = _norm_bytes(s.hidden, d) * tokens
    bias = mask_bytes(t.rows, t.width, d)
    if t.checkpointing:  # each layer's input kept; one layer recomputed (with its mask bias) during backward
        saved = s.layers * s.hidden * d * tokens + final_norm
        backward = 2 * layer * tokens + bias
    else:
        saved = s.layers * (layer * tokens + bias) + final_norm
        backward = layer * tokens
    logits = logits_bytes(s, t.rows, t.response, d, training=True) if t.logits else 0
    grads_kept = state["grads"] if t.passes > 1 else 0  # accumulation: earlier passes' gradients stay
    fixed = sum(v for k, v in state.items() if k != "grads")
    context = CUDA_CONTEXT if t.cuda else 0
    terms = {**state, "activations": saved, "backward working set": max(logits, backward),
             "optimizer step temporaries": step_temporaries(n, t), "cuda context": context}
    phases = {
        "forward/backward": fixed + grads_kept + saved + max(logits, backward) + context,
        "optimizer step": fixed + state["grads"] + step_temporaries(n, t) + context,
    }
    return Estimate(terms, max(phases.values()), phases)


def engine_estimate(s: ModelShape, d: int, tp: int, seqs: int, max_len: int, utilization: float,
                    cuda_graphs: bool, cuda: bool = True) -> Estimate:
    """One GPU of a vLLM engine: what it must hold inside its gpu_memory_utilization share."""
    replicated_kv = 2 * s.hidden * s.kv_width * (max(tp // max(s.kv_heads, 1), 1) - 1) * s.layers  # kv heads < TP
    weights = (s.num_params + replicated_kv) * d / tp
    kv = seqs * max_len * s.kv_bytes_per_token(d, tp)
    mlp = s.experts_per_token * s.expert_intermediate if s.experts else s.intermediate
    profile = VLLM_BATCHED_TOKENS * (4 * s.hidden + 3 * mlp // tp) * d + 3 * min(seqs, VLLM_DEFAULT_SEQS) * s.vocab * 4
    terms = {"weights": weights, "kv cache": kv, "activation reserve": profile, "cuda context": CUDA_CONTEXT * cuda,
             "cuda graphs": CUDA_GRAPHS if cuda_graphs and cuda else 0}
    need = sum(terms.values())
    one_seq = need - kv + max_len * s.kv_bytes_per_token(d, tp)
    note = f"KV for {seqs} sequences of {max_len} tokens: {kv / GiB:.2f} GiB; one sequence needs {one_seq / GiB:.2f} GiB"
    return Estimate(terms, need, {"engine": need}, budget_share=utilization, note=note)


def server_estimate(s: ModelShape, d: int, rows: int, width: int, response: int, logprobs: bool,
                    cuda: bool) -> Estimate:
    """A frozen reference (log-probs) or reward model (a score per row): weights and one micro-batch forward."""
    tokens = rows * width
    terms = {"weights": s.num_params * d, "forward": forward_working_bytes(s, d) * tokens + mask_bytes(rows, width, d),
             "logits": logits_bytes(s, rows, response, d, training=False) if logprobs else 0,
             "cuda context": CUDA_CONTEXT if cuda else 0}
    return Estimate(terms, sum(terms.values()), {"forward": sum(terms.values())})


# ---------------------------------------------------------------- reading shapes

def _known_shape(name: str) -> dict[str, Any] | None:
    from rayrlhf.orchestrator.known_models import KNOWN_CONFIGS

    return KNOWN_CONFIGS.get(name.removesuffix("-Instruct"))


def model_config(name: str) -> dict[str, Any]:
    """config.json of `name`: a local directory, `tiny` / `tiny:<arch>` (built, not saved), a hub id already in the
    Hugging Face cache, or one of the few hub ids whose shapes the planner ships (known_models.py)."""
    from rayrlhf.models.tiny import TINY_PREFIX

    if name == "tiny" or name.startswith(TINY_PREFIX):
        return _tiny_config(name.removeprefix(TINY_PREFIX) if name != "tiny" else "llama")
    local = Path(name) / "config.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{local}: not JSON ({exc})") from None
    if Path(name).exists() or name.startswith(("/", ".")):
        raise InvalidInput(f"{name}: no config.json there")
    cached = _cached_hub_config(name)
    if cached is not None:
        return cached
    known = _known_shape(name)
    if known is not None:
        return dict(known)
    raise InvalidInput(
        f"{name}: no config.json found (not a local directory, not in the Hugging Face cache, not a shape the "
        f"planner ships); fetch only its config (huggingface-cli download {name} config.json) or point the key "
        "at a directory holding it")


def _cached_hub_config(name: str) -> dict[str, Any] | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - an id the hub library rejects is simply not cached
        return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None


def _tiny_config(arch_name: str) -> dict[str, Any]:
    """The config `build_architecture` writes for a row of the matrix, without building the weights."""
    from transformers import AutoConfig

    from rayrlhf.models.architectures import BASE_CONFIG, architecture
    from rayrlhf.models.tiny import build_tokenizer

    arch, tok = architecture(arch_name), build_tokenizer()
    values = {"vocab_size": len(tok), **BASE_CONFIG, **arch.config}
    return AutoConfig.for_model(arch.model_type, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, **values).to_dict()


def model_shape(name: str) -> ModelShape:
    return ModelShape.from_config(model_config(name), name)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pass_rows(per_rank: int, width: int, micro_batch_size: int | None, micro_batch_tokens: int) -> tuple[int, int]:
    """(rows per pass, passes) of a rank's shard, as `losses_step.num_micro_batches` and `split_rows` cut it."""
    per_rank = max(per_rank, 1)
    if micro_batch_size:
        return min(micro_batch_size, per_rank), ceil_div(per_rank, micro_batch_size)
    n = max(1, math.ceil(per_rank * width / micro_batch_tokens))
    return ceil_div(per_rank, n), n
