"""The architecture matrix: tiny random-weight models of the families people train with RL.

Each row names a `transformers` model type and the few config values that give it the shape
that matters for RL plumbing (tied embeddings, fused projections in the checkpoint, q/k norms,
soft-capping, mixture of experts). `build_architecture` writes such a model with the project's
character tokenizer into an ordinary Hugging Face directory, with no hub access, so the same
tests run every row through vLLM and DeepSpeed. Adding an architecture is one row of `MATRIX`.

`model.policy: tiny:<name>` builds the row `<name>` for a job (`tiny` alone is `tiny:llama`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The shared shape of every tiny model: 2 layers of width 64 with 2 heads of 32 (the smallest
# head size vLLM's CPU attention kernels take).
BASE_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


@dataclass(frozen=True)
class Architecture:
    """One row of the matrix: a transformers model type and what makes it different."""

    name: str
    model_type: str
    shape: str  # what the row exercises, for the README and test ids
    like: str  # the released models of this shape
    config: dict[str, Any] = field(default_factory=dict)


MATRIX: dict[str, Architecture] = {a.name: a for a in (
    Architecture("llama", "llama", "untied embeddings, separate q/k/v and gate/up in the checkpoint",
                 "Llama-3.1-8B, TinyLlama", {"tie_word_embeddings": False}),
    Architecture("llama-tied", "llama", "tied input/output embeddings",
                 "Llama-3.2-1B/3B", {"tie_word_embeddings": True}),
    Architecture("qwen2", "qwen2", "tied embeddings, q/k/v bias",
                 "Qwen2.5-0.5B/1.5B", {"tie_word_embeddings": True}),
    Architecture("qwen3", "qwen3", "tied embeddings, q/k RMSNorm, explicit head_dim",
                 "Qwen3-0.6B/1.7B", {"tie_word_embeddings": True, "head_dim": 32}),
    Architecture("mistral", "mistral", "untied embeddings, grouped-query attention with a sliding window",
                 "Mistral-7B", {"tie_word_embeddings": False, "num_key_value_heads": 1, "sliding_window": 64}),
    Architecture("gemma2", "gemma2", "scaled embeddings, attention and final-logit soft-capping, tied "
                 "embeddings with no lm_head in vLLM", "Gemma-2-2B/9B",
                 {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64}),
    Architecture("gemma3", "gemma3_text", "scaled embeddings, q/k norm, local and global attention layers, tied",
                 "Gemma-3-1B (text)", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64}),
    Architecture("phi3", "phi3", "fused qkv_proj and gate_up_proj in the checkpoint itself",
                 "Phi-3/Phi-3.5-mini, Phi-4-mini", {"tie_word_embeddings": False}),
    Architecture("qwen3-moe", "qwen3_moe", "mixture of experts (router + 4 experts, top-2); transformers keeps "
                 "the experts fused in memory, per expert in the checkpoint", "Qwen3-30B-A3B",
                 {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "decoder_sparse_step": 1, "tie_word_embeddings": False}),
    Architecture("mixtral", "mixtral", "mixture of experts (w1/w2/w3 experts, top-2)", "Mixtral-8x7B",
                 {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False}),
)}


def architecture(name: str) -> Architecture:
    """The row `name`, or a ValueError listing the rows."""
    try:
        return MATRIX[name]
    except KeyError:
        raise ValueError(f"unknown tiny architecture {name!r}; the matrix has {sorted(MATRIX)}") from None


def architecture_config(name: str, **overrides: Any) -> Any:
    """The transformers config of row `name` with the character tokenizer's vocabulary and special ids
    (what `build_architecture` writes; the planner reads it without building the model)."""
    from transformers import AutoConfig

    from rayrlhf.models.tiny import build_tokenizer

    arch = architecture(name)
    tok = build_tokenizer()
    values = {"vocab_size": len(tok), **BASE_CONFIG, **arch.config, **overrides}  # a larger vocab_size: ids past the
    return AutoConfig.for_model(  # tokenizer's are never produced by it, but size the embeddings and logits
        arch.model_type, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, dtype="float32", **values,
    )


def build_architecture(
    name: str, output_dir: str | Path, seed: int = 0, **overrides: Any
) -> Path:
    """Write a randomly initialised model of row `name` and the character tokenizer to `output_dir`.

    `overrides` change the shared shape (e.g. ``hidden_size=128, num_hidden_layers=4``).
    """
    return build_from_config(architecture_config(name, **overrides), output_dir, seed)


def build_model_type(model_type: str, output_dir: str | Path, seed: int = 0, **values: Any) -> Path:
    """Like `build_architecture` for any transformers model type outside the matrix: `values` are its config
    (sizes in that model type's own key names), the vocabulary and special ids are the character tokenizer's."""
    from transformers import AutoConfig

    from rayrlhf.models.tiny import build_tokenizer

    tok = build_tokenizer()
    config = AutoConfig.for_model(model_type, **{"vocab_size": len(tok), **values}, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype="float32")
    return build_from_config(config, output_dir, seed)


def build_from_config(config: Any, output_dir: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised causal LM of `config` and the character tokenizer to `output_dir`."""
    from transformers import AutoModelForCausalLM

    from rayrlhf.models.tiny import build_tokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
