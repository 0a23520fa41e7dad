"""Reward functions for the demo's `sort` task and for tests (signature in docs/design.md)."""

from __future__ import annotations


def sort_score(response: str, answer: str) -> float:
    """1.0 for the exact answer; otherwise partial credit for right letters in the right places,
    minus a length mismatch term, so that a policy gets a gradient before it is ever right."""
    response = response.strip()
    if response == answer:
        return 1.0
    hits = sum(a == b for a, b in zip(response, answer))
    return 0.5 * hits / len(answer) - 0.1 * min(abs(len(response) - len(answer)), 5) / 5


def sort_reward(prompts: list[str], responses: list[str], answer: list[str], **_: object) -> list[float | None]:
    """Score each response against its row's `answer` column."""
    return [sort_score(r, a) for r, a in zip(responses, answer, strict=True)]


def alphabet_reward(prompts: list[str], responses: list[str], **_: object) -> list[float | None]:
    """Share of each response's characters that are letters a-p (the sort task's alphabet).

    A randomly initialised model scores about 0.16 (16 of ~100 characters); any policy-gradient
    loop lifts it towards 1 within a few dozen steps, so tests of "RL learns" have a wide margin.
    """
    return [sum("a" <= ch <= "p" for ch in r) / len(r) if r else 0.0 for r in responses]


def tool_answer(prompts: list[str], responses: list[str], answer: list[str], transcript: list | None = None,
                **_: object) -> list[float | None]:
    """The `lookup` task (rayrlhf.data.tool_task): 1.0 when the episode's last assistant turn is the row's
    `answer`, else 0.0 (a single response is its own last turn)."""
    out = []
    for i, (response, expected) in enumerate(zip(responses, answer, strict=True)):
        turns = transcript[i] if transcript is not None else None
        last = next((t["content"] for t in reversed(turns) if t["role"] == "assistant"), "") if turns else response
        out.append(1.0 if last.strip() == expected else 0.0)
    return out
