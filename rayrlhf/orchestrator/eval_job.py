"""Evaluation outside training (`rayrlhf eval`): a saved policy scored on a data file exactly as in training.

Only what evaluation needs starts: the rollout workers (which load the policy from its folder and keep it),
the reward servers and the environments, with no trainers and no reference (`System(trainers=False)`). The
figures come from the same `evaluation.evaluate` the training loop calls, with the same prompt selection,
request seeds and decoding (`schedule.eval_*`), so a greedy evaluation of a checkpoint reproduces the one
the run logged for that step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rayrlhf.config import JobConfig
from rayrlhf.data.datasets import load_prompts, reward_columns
from rayrlhf.errors import InvalidInput
from rayrlhf.models.loading import load_tokenizer
from rayrlhf.orchestrator.episodes import TRANSCRIPT, stop_token_ids
from rayrlhf.orchestrator.evaluation import eval_prompts, evaluate
from rayrlhf.orchestrator.plan import check_plan, resolve_backend
from rayrlhf.orchestrator.preflight import Checked, check_episodes, checked_model, tool_schemas_of

log = logging.getLogger(__name__)


def eval_preflight(cfg: JobConfig) -> Checked:
    """The checks of an evaluation, before Ray starts: the plan, the policy and its tokenizer, data.eval, the
    reward model or functions (against data.eval's columns) and the environment; InvalidInput names what fails."""
    from rayrlhf.rewards.functions import check_reward_function

    if not cfg.algorithm.is_online:
        raise InvalidInput(f"algorithm.name={cfg.algorithm.name}: evaluation needs an online RL config (its reward); "
                           "pass --config with one")
    if not cfg.data.eval:
        raise InvalidInput("evaluation needs data.eval (rayrlhf eval --data FILE)")
    plan = check_plan(cfg)
    cfg.rollout.backend = resolve_backend(cfg)
    cache = Path(cfg.output_dir) / ".models"
    policy = checked_model(cfg, "model.policy", cfg.model.policy, cache)
    try:
        tokenizer = load_tokenizer(policy, cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise InvalidInput(f"the policy {policy}: cannot load its tokenizer ({exc})") from None
    reward_model = checked_model(cfg, "model.reward", cfg.model.reward, cache) if cfg.model.reward else None
    d = cfg.data
    tools = tool_schemas_of(cfg)
    data = load_prompts(d.eval, tokenizer, d.max_prompt_tokens, d.overlong_prompts, d.apply_chat_template, cfg.seed,
                        shuffle=False, prompt_key=d.prompt_key, messages_key=d.messages_key, tools=tools)
    if not len(data):
        raise InvalidInput(f"{d.eval}: no prompt to evaluate")
    columns = list(reward_columns(data.rows[:1]))
    if cfg.env.enabled:
        check_episodes(cfg, tokenizer, data.rows[0], tools)
        columns.append(TRANSCRIPT)
    if cfg.reward.function:
        check_reward_function(cfg.reward.function, columns)
    for i, entry in enumerate(cfg.reward.functions or []):
        check_reward_function(entry.function, columns, key=f"reward.functions[{i}].function")
    if cfg.reward.eval_function:
        check_reward_function(cfg.reward.eval_function, columns, key="reward.eval_function")
    return Checked(plan, policy, None, policy, reward_model, tokenizer, data, data, tools)


def run_evaluation(cfg: JobConfig, checked: Checked, step: int) -> dict[str, Any]:
    """Start the evaluation actors on the connected Ray, evaluate `checked.eval` once, stop them; returns the
    `eval/...` figures (as a training row's) and the number of prompts evaluated."""
    from rayrlhf.orchestrator.system import System

    assert checked.eval is not None
    system = System(cfg, checked, trainers=False)
    try:
        figures = evaluate(system, checked.eval, cfg, step, stop_token_ids(checked.tokenizer, cfg.data.apply_chat_template),
                           checked.tool_schemas)
    finally:
        system.shutdown()
    return {"prompts": len(eval_prompts(checked.eval, cfg)), "figures": figures}
