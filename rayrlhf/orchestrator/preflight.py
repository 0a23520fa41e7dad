"""Everything about an online job that can be checked before any actor starts.

A mistake found here costs a second and exits 2 with the key, file or line; the same mistake
found by an actor costs the start-up of the DeepSpeed groups and the engines and ends in a
Ray traceback. Checked: the actor plan, every model and tokenizer exists (a local directory or a
hub id the machine can resolve), the critic shares the policy's tokenizer (its values are read
at the policy's token positions), data.train and data.eval exist and parse, every prompt fits,
and reward.function, every reward.functions entry and reward.eval_function import and take the
data's columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrlhf.config import JobConfig
from rayrlhf.data.datasets import PromptDataset, load_prompts, load_rows, reward_columns
from rayrlhf.errors import InvalidInput
from rayrlhf.models.loading import load_tokenizer, same_tokenizer
from rayrlhf.models.tiny import resolve_model_path
from rayrlhf.orchestrator.episodes import TRANSCRIPT
from rayrlhf.orchestrator.plan import ActorPlan, check_plan, resolve_backend, resolve_lora_sync

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """What the checks resolved, handed to the job so nothing is loaded twice."""

    plan: ActorPlan
    policy: str
    critic: str | None
    reference: str
    reward_model: str | None
    tokenizer: Any
    train: PromptDataset
    eval: PromptDataset | None
    tool_schemas: list[dict] | None = None  # env.tools' JSON schemas, shown to the model (multi-turn)


def checked_model(cfg: JobConfig, key: str, name: str, cache: Path) -> str:
    """A model path or hub id that exists, with the config key named when it does not."""
    from transformers import AutoConfig

    path = resolve_model_path(name, cache, cfg.seed)
    refuse_adapter_dir(key, path)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, hub errors: all mean "cannot load it"
        raise InvalidInput(f"{key}: cannot load a model config from {name!r} ({type(exc).__name__}: {exc})") from None
    return path


def refuse_adapter_dir(key: str, path: str) -> None:
    """A LoRA run's final/ (a peft adapter, no model of its own) is not a model to start from: say how to get one."""
    folder = Path(path)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        run = folder.parent if folder.name == "final" else folder
        raise InvalidInput(
            f"{key}: {path} holds a LoRA adapter, not a model; merge it into its base first with `rayrlhf export {run} "
            f"--merge` and use {run / 'merged'}"
        )


def check_lora_targets(cfg: JobConfig, path: str, role: str = "policy") -> None:
    """Every name in model.lora.target_modules is a linear layer of the model (checked on its meta-device copy)."""
    from rayrlhf.models.lora import meta_model, target_module_names

    lora = cfg.model.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    try:
        target_module_names(meta_model(path, cfg.model.trust_remote_code, role), targets)
    except ValueError as exc:
        raise InvalidInput(f"{exc} (model {path})") from None


def preflight(cfg: JobConfig) -> Checked:
    """Run every check, in the order a user would fix them; raises InvalidInput naming what is wrong."""
    from rayrlhf.rewards.functions import check_reward_function

    plan = check_plan(cfg)
    cfg.rollout.backend = resolve_backend(cfg)  # `auto` decided once: config.yaml, the workers and metrics show it
    cache = Path(cfg.output_dir) / ".models"
    policy = checked_model(cfg, "model.policy", cfg.model.policy, cache)
    if cfg.model.lora is not None:
        cfg.model.lora.sync = resolve_lora_sync(cfg, cfg.rollout.backend)[0]  # like the backend: decided once
        check_lora_targets(cfg, policy)
    try:
        tokenizer = load_tokenizer(policy, cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise InvalidInput(f"model.policy: cannot load its tokenizer from {policy} ({exc})") from None
    critic = checked_model(cfg, "model.critic", cfg.model.critic, cache) if cfg.algorithm.name == "ppo" else None
    if critic is not None and not same_tokenizer(critic, policy, cfg.model.trust_remote_code):
        raise InvalidInput(
            f"model.critic {cfg.model.critic} has another tokenizer than model.policy: a critic's values are read at "
            "the policy's token positions, so it must share the policy's tokenizer (start it from the policy, or from a "
            "reward model trained on it)"
        )
    reference = checked_model(cfg, "model.reference", cfg.model.reference or cfg.model.policy, cache)
    reward_model = checked_model(cfg, "model.reward", cfg.model.reward, cache) if cfg.model.reward else None
    d = cfg.data
    tools = tool_schemas_of(cfg)
    keys = {"prompt_key": d.prompt_key, "messages_key": d.messages_key, "tools": tools}
    train = load_prompts(d.train, tokenizer, d.max_prompt_tokens, d.overlong_prompts, d.apply_chat_template, cfg.seed,
                         d.shuffle, **keys)
    evaluation = None
    if d.eval:
        evaluation = load_prompts(d.eval, tokenizer, d.max_prompt_tokens, d.overlong_prompts, d.apply_chat_template,
                                  cfg.seed, shuffle=False, **keys)
    columns = list(reward_columns(train.rows[:1]))
    if cfg.env.enabled:
        check_episodes(cfg, tokenizer, train.rows[0], tools)
        columns.append(TRANSCRIPT)  # reward functions of episodes also get the turns
    if cfg.reward.function:
        check_reward_function(cfg.reward.function, columns)
    for i, entry in enumerate(cfg.reward.functions or []):
        check_reward_function(entry.function, columns, key=f"reward.functions[{i}].function")
    if cfg.reward.eval_function:
        if evaluation is None:
            raise InvalidInput("reward.eval_function scores evaluation rows: it needs data.eval")
        check_reward_function(cfg.reward.eval_function, list(reward_columns(evaluation.rows[:1])), key="reward.eval_function")
    if cfg.algorithm.ptx_coef > 0:
        load_rows(d.pretrain, "text")
    log.info("checks passed: %d training prompts%s", len(train), f", {len(evaluation)} eval prompts" if evaluation else "")
    return Checked(plan, policy, critic, reference, reward_model, tokenizer, train, evaluation, tools)


def tool_schemas_of(cfg: JobConfig) -> list[dict] | None:
    """env.tools' JSON schemas (from type hints and docstrings), or None; an import error names env.tools."""
    if not cfg.env.tools:
        return None
    from rayrlhf.envs.tools import load_tools, tool_schemas

    return tool_schemas(load_tools(cfg.env.tools))


def check_episodes(cfg: JobConfig, tokenizer: Any, row: dict[str, Any], tools: list[dict] | None) -> None:
    """The environment imports, constructs with env.kwargs and resets on a real row (in a host process, as in
    the job); a chat template that rewrites earlier turns is said once here."""
    from rayrlhf.data.chat import chat_format
    from rayrlhf.envs import check_env

    check_env(cfg.env, {k: v for k, v in row.items() if k != "_where"})
    unstable = chat_format(tokenizer, cfg.data.apply_chat_template).check_prefix_stable(tools)
    if unstable:
        log.warning("the chat template is not prefix-stable (%s): each environment turn is rendered after a fixed "
                    "context instead of the real one; the trained tokens are still exactly the sampled ones", unstable)
