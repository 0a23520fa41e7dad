r"""Verifiable math rewards: the response's final answer compared symbolically with the row's `answer`.

`accuracy` is RL-with-verifiable-rewards' reward: 1.0 when the final answer equals the gold one as
mathematics (``\frac{1}{2}`` = ``0.5``, ``\{1, 2\}`` = ``\{2, 1\}``, ``(x+1)^2`` = ``x^2+2x+1``), else
0.0. The comparison is the `math-verify` package's (sympy underneath); extraction is ours and kept
simple so that what counts as "the answer" is predictable:

1. the content of the last complete ``\boxed{...}`` (or ``\fbox{...}``) in the response;
2. else the text after the last "answer is" / "answer:" (any case) to the end of its line, in the
   response's last `TAIL_CHARS` characters, read by math-verify's own extraction (``$...$`` LaTeX,
   then plain expressions);
3. else the last number in those characters (``-12``, ``3.5``, ``3/4``, ``1,000``).

No answer found, or one longer than `MAX_ANSWER_CHARS`, scores 0.0. A gold answer that does not
parse (empty, unbalanced LaTeX, plain prose) gives None: the sample is unscored, because a reward
that cannot be right must not teach the policy anything; such rows show in `reward/failed`.

Time: sympy can take minutes on adversarial expressions (towers of powers, huge factorials). Each
gold answer and each response gets at most `GOLD_TIMEOUT_S` / `ANSWER_TIMEOUT_S` seconds (a SIGALRM
timer, so only in the main thread: where the reward runs, in its own process under
FunctionRunner); an answer not compared in time scores 0.0, a gold answer not parsed in time None.
Elsewhere (another thread) there is no per-sample bound, and reward.timeout_s bounds the batch.
math-verify's own timeouts use the same signal and are turned off in favour of these.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

__all__ = ["accuracy", "count_boxed", "extract_answer", "format", "last_boxed", "score_answer"]

GOLD_TIMEOUT_S = 2.0
ANSWER_TIMEOUT_S = 2.0
MAX_ANSWER_CHARS = 1000
TAIL_CHARS = 2000

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MARKER = re.compile(r"answer\s*(?:is\b\s*:?|:)\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")
T = TypeVar("T")


class _OutOfTime(BaseException):
    """Raised by the timer: a BaseException, so that math-verify's `except Exception` cannot swallow it."""


class _DropTimeoutWarnings(logging.Filter):
    """math-verify warns that its timeouts are off; they are, because this module bounds the time itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarnings())


def _bounded(seconds: float, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
    """(finished, result) of ``fn(*args)`` stopped after `seconds` (main thread only; elsewhere unbounded)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return True, fn(*args)

    def on_alarm(signum: int, frame: Any) -> None:
        raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return True, fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _OutOfTime:
        return False, None
    finally:
        signal.signal(signal.SIGALRM, previous)


def _boxes(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` / ``\\fbox{...}``, by position (one linear pass over the
    braces, so a long response full of unclosed boxes costs no more than any other)."""
    found: list[tuple[int, str]] = []
    open_braces: list[tuple[int, int] | None] = []  # per open brace: (command start, content start) of a box
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if text[i + 1 : i + 2] in ("{", "}"):  # an escaped brace, as in a set \{1, 2\}, is text
                i += 2
                continue
            command = next((c for c in _BOX_COMMANDS if text.startswith(c + "{", i)), None)
            if command is not None:
                open_braces.append((i, i + len(command) + 1))
                i += len(command) + 1
                continue
        elif ch == "{":
            open_braces.append(None)
        elif ch == "}" and open_braces:
            box = open_braces.pop()
            if box is not None:
                found.append((box[0], text[box[1] : i]))
        i += 1
    return [content for _, content in sorted(found)]


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), None when there is none."""
    boxes = _boxes(text)
    return boxes[-1] if boxes else None


def count_boxed(text: str) -> int:
    """How many complete, non-empty ``\\boxed{...}`` / ``\\fbox{...}`` the text holds."""
    return sum(bool(content.strip()) for content in _boxes(text))


def extract_answer(response: str) -> tuple[str, str] | None:
    """(answer text, where it came from: "boxed", "marker" or "number"), or None; rules in the module doc."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed, "boxed"
    tail = response[-TAIL_CHARS:]
    markers = list(_MARKER.finditer(tail))
    if markers:
        return markers[-1].group(1).strip(), "marker"
    numbers = _NUMBER.findall(tail)
    if numbers:
        return numbers[-1].replace(",", ""), "number"
    return None


def _parse_gold(gold: str) -> list[Any] | None:
    """math-verify's parse of a gold answer (LaTeX with or without $...$ or \\boxed), None if it has no math."""
    from math_verify import parse

    text = gold.strip()
    if not text:
        return None
    if "$" not in text and "\\boxed" not in text:
        text = f"${text}$"
    parsed = parse(text, parsing_timeout=None)
    return parsed if any(not isinstance(p, str) for p in parsed) else None


def _matches(gold: list[Any], answer: str, source: str) -> bool:
    from math_verify import parse, verify

    if source == "boxed":
        parsed = parse("\\boxed{" + answer + "}", parsing_timeout=None)
    else:
        parsed = parse(answer, parsing_timeout=None)
    return bool(parsed) and verify(gold, parsed, timeout_seconds=None)


def score_answer(
    response: str, gold: str, gold_cache: dict[str, list[Any] | None] | None = None,
    answer_timeout_s: float = ANSWER_TIMEOUT_S, gold_timeout_s: float = GOLD_TIMEOUT_S,
) -> float | None:
    """1.0 / 0.0 for one response against its gold answer, None when the gold answer does not parse."""
    cache = {} if gold_cache is None else gold_cache
    if gold not in cache:
        finished, parsed = _bounded(gold_timeout_s, _parse_gold, str(gold))
        if not finished:
            log.warning("gold answer %r: not parsed within %gs; its samples are unscored", str(gold)[:80], gold_timeout_s)
        cache[gold] = parsed if finished else None
    parsed_gold = cache[gold]
    if parsed_gold is None:
        return None
    extracted = extract_answer(response)
    if extracted is None or len(extracted[0]) > MAX_ANSWER_CHARS:
        return 0.0
    finished, same = _bounded(answer_timeout_s, _matches, parsed_gold, *extracted)
    return 1.0 if finished and same else 0.0


def accuracy(prompts: list[str], responses: list[str], answer: list[Any], **columns: Any) -> list[float | None]:
    """Reward function: 1.0 when a response's final answer equals its row's `answer` column, else 0.0;
    None for a row whose answer does not parse (see the module doc for extraction and time bounds)."""
    cache: dict[str, list[Any] | None] = {}  # a group's samples share their gold answer: parse it once
    return [score_answer(r, "" if a is None else str(a), cache) for r, a in zip(responses, answer, strict=True)]


def format(prompts: list[str], responses: list[str], **columns: Any) -> list[float | None]:  # noqa: A001
    """Reward function: 1.0 when a response states exactly one non-empty ``\\boxed{...}`` answer, else 0.0.

    Meant as a small weighted term beside `accuracy` (reward.functions): it teaches the answer
    format early, while accuracy is still mostly 0."""
    return [1.0 if count_boxed(r) == 1 else 0.0 for r in responses]
