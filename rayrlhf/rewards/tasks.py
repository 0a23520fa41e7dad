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


def _matching(a: str, b: str) -> float:
    """Share of `b`'s characters that `a` has at the same place (0 unless the lengths agree)."""
    return sum(x == y for x, y in zip(a, b)) / len(b) if b and len(a) == len(b) else 0.0


def tool_answer(prompts: list[str], responses: list[str], answer: list[str], transcript: list | None = None,
                **_: object) -> list[float | None]:
    """The `box` task (rayrlhf.data.tool_task): up to 0.5 for the tool call and up to 0.5 for the answer.

    The call earns 0.5 when the tool returned the row's `answer` (the box was opened), else 0.4 x how close the
    first turn is to a well-formed call; the answer earns 0.5 x the share of its characters right. The partial
    credit gives a policy a gradient before it gets whole episodes right (1.0: opened and copied). A single
    response (no transcript) can only earn the answer's half."""
    import difflib

    from rayrlhf.data.tool_task import CALL

    out = []
    for i, (response, expected) in enumerate(zip(responses, answer, strict=True)):
        turns = transcript[i] if transcript is not None else None
        mine = [t["content"] for t in turns or () if t["role"] == "assistant"]
        opened = bool(turns) and any(t["role"] == "tool" and t["content"].strip() == expected for t in turns)
        call = 0.5 if opened else 0.4 * difflib.SequenceMatcher(None, mine[0], CALL).ratio() if len(mine) > 1 else 0.0
        last = mine[-1] if mine else response
        out.append(call + 0.5 * _matching(last.strip(), expected))
    return out
