"""The reward server: a frozen scorer of rollouts by a reward model, a Python function, several weighted
functions, or an HTTP endpoint.

It lives apart from the reference server and imports torch and transformers only when it serves a
reward model: a job scored by a function starts one process fewer that loads them, which on a small
machine is start-up time every actor waits for (docs/performance.md, start-up).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from rayrlhf.actors.health import identity

log = logging.getLogger(__name__)


class RewardServer:
    """The reward: a sequence-classification model, a Python function, several weighted functions,
    or a remote HTTP endpoint.

    `score` returns one float per sample, or None for a sample that could not be scored (a
    function that raised or timed out, an endpoint that kept failing, a model score that is NaN
    or infinite). With `functions` (reward.functions) each function runs in its own child process,
    all of them at once, and the score is their weighted sum (`rewards.combine.weighted_sum`);
    `score_parts` also returns each function's own scores. A reward model whose tokenizer differs from the policy's scores the decoded
    prompt and response, re-tokenized with its own tokenizer (and chat template, if it has one);
    with the same tokenizer it scores the policy's tokens as they are.
    """

    def __init__(
        self,
        model_path: str | None = None,
        function: str | None = None,
        url: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        micro_batch_size: int = 16,
        policy_tokenizer: str | None = None,
        auth_token_env: str | None = None,
        no_dropout: bool = True,
        functions: list[dict[str, Any]] | None = None,
    ) -> None:
        if sum(x is not None for x in (model_path, function, url, functions)) != 1:
            raise ValueError("RewardServer needs exactly one of model_path, function, url, functions")
        self.kind = "model" if model_path else "function" if function else "url" if url else "functions"
        self.timeout_s, self.max_retries, self.micro_batch_size = timeout_s, max_retries, micro_batch_size
        self.url, self.auth_token_env = url, auth_token_env
        self.fn = None
        self.model = None
        self.tokenizer = None  # the reward model's own, when it is not the policy's
        self.device = "cpu"
        if model_path:
            from rayrlhf.actors.scorers import _device
            from rayrlhf.models.loading import load_reward_model, load_tokenizer, same_tokenizer

            self.device = _device()
            self.model = load_reward_model(model_path, dtype, trust_remote_code, no_dropout).to(self.device).eval()
            if policy_tokenizer is not None and not same_tokenizer(model_path, policy_tokenizer, trust_remote_code):
                self.tokenizer = load_tokenizer(model_path, trust_remote_code)
                log.info("reward model %s has its own tokenizer: it scores re-tokenized text", model_path)
        elif function:
            from rayrlhf.rewards.functions import FunctionRunner

            self.fn = FunctionRunner(function, timeout_s)
        self.parts: dict[str, tuple[float, Any]] = {}  # reward.functions: name -> (weight, its runner)
        if functions:
            self._start_parts(functions)

    def _start_parts(self, functions: list[dict[str, Any]]) -> None:
        """One FunctionRunner per weighted function (entries: function, weight, name; names distinct)."""
        from concurrent.futures import ThreadPoolExecutor

        from rayrlhf.rewards.functions import FunctionRunner

        try:
            for entry in functions:
                name = entry.get("name") or entry["function"].rpartition(":")[2]
                if name in self.parts:
                    raise ValueError(f"reward.functions: two functions are named {name!r}")
                self.parts[name] = (float(entry.get("weight", 1.0)), FunctionRunner(entry["function"], self.timeout_s))
        except BaseException:
            for _, runner in self.parts.values():
                runner.close()
            raise
        self._pool = ThreadPoolExecutor(max_workers=len(self.parts), thread_name_prefix="reward-part")

    def ready(self) -> bool:
        return True

    def identity(self) -> tuple[str, int]:
        """(node id, pid), for a stack dump from outside should this server hang."""
        return identity()

    def function_restarts(self) -> int:
        """Times the reward function's child process was started again (it died or hung)."""
        return self.fn.restarts if self.fn is not None else 0

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        columns: dict[str, list] | None = None,
        batch: dict[str, Any] | None = None,
    ) -> list[float | None]:
        """Scores for a batch of samples; `batch` (token tensors) is needed by a reward model only."""
        from rayrlhf.rewards.functions import _clean

        columns = columns or {}
        if self.kind == "model":
            if self.tokenizer is not None:
                batch = self._retokenize(prompts, responses)
            if batch is None:
                raise ValueError("a reward model scores token batches: pass batch=")
            return [_clean(x) for x in self._model_scores(batch)]
        if self.kind == "function":
            from rayrlhf.rewards.functions import score_with_function

            return score_with_function(self.fn, prompts, responses, columns, self.timeout_s)
        if self.kind == "functions":
            return self.score_parts(prompts, responses, columns)[0]
        from rayrlhf.rewards.remote import score_with_http

        token = os.environ.get(self.auth_token_env, "") if self.auth_token_env else ""
        return score_with_http(self.url, prompts, responses, columns, self.timeout_s, self.max_retries, token=token or None)

    def score_parts(
        self,
        prompts: list[str],
        responses: list[str],
        columns: dict[str, list] | None = None,
        batch: dict[str, Any] | None = None,
    ) -> tuple[list[float | None], dict[str, list[float | None]]]:
        """(combined scores, each function's scores by name) for a batch; the parts are empty unless the
        reward is reward.functions. The functions run concurrently, each in its own process and within
        its own reward.timeout_s, so a batch costs the slowest function, not their sum."""
        if self.kind != "functions":
            return self.score(prompts, responses, columns, batch), {}
        from rayrlhf.rewards.combine import weighted_sum
        from rayrlhf.rewards.functions import score_with_function

        columns = columns or {}
        futures = {name: self._pool.submit(score_with_function, runner, prompts, responses, columns, self.timeout_s)
                   for name, (_, runner) in self.parts.items()}
        parts = {name: future.result() for name, future in futures.items()}
        return weighted_sum(parts, {name: weight for name, (weight, _) in self.parts.items()}), parts

    def _model_scores(self, batch: dict[str, Any]) -> list[float]:
        """The reward model's score of every sample of a token batch, in micro-batches."""
        import torch

        from rayrlhf.actors.scorers import _micro_batches
        from rayrlhf.models.forward import sequence_scores

        parts = []
        with torch.no_grad():
            for mb in _micro_batches(batch, self.micro_batch_size):
                mb = {k: v.to(self.device) for k, v in mb.items()}
                parts.append(sequence_scores(self.model, mb).cpu())
        return [float(x) for x in torch.cat(parts)]

    def _retokenize(self, prompts: list[str], responses: list[str]) -> dict[str, Any]:
        """The samples as the reward model's own tokenizer and chat template write them."""
        from rayrlhf.models.forward import pack_batch

        tok = self.tokenizer
        ids = []
        for prompt, response in zip(prompts, responses, strict=True):
            if getattr(tok, "chat_template", None):
                chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                ids.append(tok.apply_chat_template(chat, tokenize=True, return_dict=False))
            else:
                ids.append(tok(prompt + response, add_special_tokens=True)["input_ids"] + [tok.eos_token_id])
        return pack_batch([[] for _ in ids], ids, tok.pad_token_id)


RemoteRewardServer = ray.remote(RewardServer)
