"""Load the policy (causal LM), critic (per-token value head) and reward model (scalar head).

Each takes a local directory or a hub id. Custom modelling code runs only when the job config
says `model.trust_remote_code: true`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rayrlhf.config.job import precision_conflict

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bfloat16 on a GPU that supports it, float32 elsewhere (CPU kernels are fastest in fp32)."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def training_precision(dtype: str, bf16: bool | None) -> tuple[bool, str]:
    """(bf16 mixed precision on, the dtype a trainer loads its weights in) for `model.dtype` and `trainer.bf16`.

    AdamW must step float32 weights: without mixed precision there is no float32 master copy, and an
    update smaller than a bfloat16 weight's spacing (lr 1e-6 on a weight of 1: 2^-8) rounds away. So
    `bf16: null` turns mixed precision on where the GPU supports it and wherever the weights resolve to
    bfloat16 (DeepSpeed then keeps float32 masters), and with it off the trainer loads float32 whatever
    `model.dtype` says for the engines ('auto', float16). An explicit `bf16: false` with half-precision
    weights is refused (`config.job.precision_conflict`).
    """
    problem = precision_conflict(dtype, bf16)
    if problem:
        raise ValueError(problem)
    if bf16 is None:
        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) or resolve_dtype(dtype) == torch.bfloat16
    return (True, dtype) if bf16 else (False, "float32")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token guaranteed (EOS stands in when the model has none)."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _pad_id(path: str | Path, trust_remote_code: bool) -> int | None:
    return load_tokenizer(path, trust_remote_code).pad_token_id


def same_tokenizer(path_a: str | Path, path_b: str | Path, trust_remote_code: bool = False) -> bool:
    """Whether two models tokenize text the same way (same vocabulary and special tokens)."""
    if Path(str(path_a)).resolve() == Path(str(path_b)).resolve():
        return True
    a, b = load_tokenizer(path_a, trust_remote_code), load_tokenizer(path_b, trust_remote_code)
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def disable_dropout(model: PreTrainedModel) -> PreTrainedModel:
    """Set every dropout probability of `model` (its layers and its config) to 0, in place.

    RL scores rollouts in eval mode and updates in train mode; with dropout the two are different
    networks, and the PPO ratio of a sample under the very weights that produced it is not 1.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key, value in model.config.to_dict().items():
        if isinstance(value, float) and value > 0 and ("dropout" in key or key.endswith("pdrop")):
            setattr(model.config, key, 0.0)
    for module in model.modules():  # attention implementations read their dropout from attributes
        for attr in ("attention_dropout", "dropout", "resid_pdrop", "embd_pdrop"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model


def load_policy(
    path: str | Path, dtype: str = "auto", trust_remote_code: bool = False, no_dropout: bool = True
) -> PreTrainedModel:
    """A causal LM for the policy or the frozen reference."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    return disable_dropout(model) if no_dropout else model


def load_critic(
    path: str | Path, dtype: str = "auto", trust_remote_code: bool = False, no_dropout: bool = True
) -> PreTrainedModel:
    """The value model V(s_t) for GAE: a one-label sequence classifier whose `score` head is read at
    every token (`forward.token_values`), not only at the last one.

    Initialised from a causal LM (new head) or from a reward model of the same architecture, whose
    `score` head carries over, as InstructGPT initialises its value function from the RM. Every
    architecture with a sequence-classification class works (token-classification classes are
    missing for some, e.g. Gemma-3, and add a dropout layer before their head).
    """
    return load_reward_model(path, dtype, trust_remote_code, no_dropout)


def load_reward_model(
    path: str | Path, dtype: str = "auto", trust_remote_code: bool = False, no_dropout: bool = True
) -> PreTrainedModel:
    """A sequence classifier with one label: the score read at the last non-padding token."""
    auto_class, config = role_config("reward", path, trust_remote_code)
    model = auto_class.from_pretrained(str(path), config=config, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    return disable_dropout(model) if no_dropout else model


def role_config(role: str, path: str | Path, trust_remote_code: bool = False) -> tuple[type, Any]:
    """(transformers auto class, config) a role's model is built from: a causal LM for the policy and the
    reference; a one-label sequence classifier, with a pad token to find each row's last token, for the critic
    and the reward model."""
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if role in ("policy", "reference"):
        return AutoModelForCausalLM, config
    config.num_labels = 1
    if config.pad_token_id is None:
        config.pad_token_id = _pad_id(path, trust_remote_code)
    return AutoModelForSequenceClassification, config
