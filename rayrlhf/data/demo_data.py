"""Synthetic InstructGPT data for the `sort` task: demonstrations, preference pairs, held-out prompts.

The task: the prompt is `sort: <letters>` and the right response is the letters in alphabetical
order (as in `rayrlhf.data.tasks`), here with 3-6 *distinct* letters out of 16. The quality rule
`rayrlhf.rewards.tasks.sort_score` stands in for human labellers. Distinct letters make a
response checkable piece by piece (every letter is in the prompt, each one above the one
before, as many as in the prompt), so a small reward model can learn the whole rule and PPO
finds no blind spot in it to exploit; with repeated letters a right-length, sorted response
with a wrong letter was what PPO drifted to. The data mimics what labellers produce:

* **demonstrations** (SFT rows: prompt, response) are written by hand, so a share of them
  (`noise`) carries a slip: two neighbouring letters swapped, or a letter dropped or doubled.
  Writing a perfect answer is harder than judging one, which is why InstructGPT goes on to
  ranking.
* **comparisons** (RM / DPO rows: prompt, chosen, rejected) are a correct response and a
  slipped one (the slips above, or a letter replaced by another), ordered by the rule:
  `chosen` is always the one the rule scores higher. `ranked_pairs` makes comparisons the
  InstructGPT way too: from several responses of a model to one prompt, ranked by the rule.
* **held-out prompts** (with their `answer`) measure the rule's score of a model's responses.

`python -m rayrlhf.data.demo_data DIR` regenerates the files checked in under
`cluster_configs/local-cpu/data/`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from rayrlhf.data.tasks import write_jsonl
from rayrlhf.rewards.tasks import sort_score

LETTERS = "abcdefghijklmnop"
SLIPS = ("swap", "replace", "drop", "double")
WRITING_SLIPS = ("swap", "drop", "double")


def slip(answer: str, rng: random.Random, kinds: tuple[str, ...] = SLIPS, letters: str = LETTERS) -> str:
    """`answer` with one slip of one of `kinds`; always different from `answer`, so the rule scores it lower."""
    while True:
        kind, s = rng.choice(kinds), list(answer)
        if kind == "swap" and len(s) > 1:
            i = rng.randrange(len(s) - 1)
            s[i], s[i + 1] = s[i + 1], s[i]
        elif kind == "replace":
            i = rng.randrange(len(s))
            s[i] = rng.choice([c for c in letters if c != s[i]])
        elif kind == "drop" and len(s) > 1:
            del s[rng.randrange(len(s))]
        elif kind == "double":
            i = rng.randrange(len(s))
            s.insert(i, s[i])
        out = "".join(s)
        if out != answer:
            return out


def sort_rows(n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[dict[str, str]]:
    """`n` prompts of the task (distinct letters) with their answers, reproducible from `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letters = "".join(rng.sample(LETTERS, rng.randint(min_len, max_len)))
        rows.append({"prompt": f"sort: {letters}", "answer": "".join(sorted(letters))})
    return rows


def demonstrations(n: int, seed: int, noise: float = 0.2) -> list[dict[str, str]]:
    """SFT rows; a share `noise` of the responses carries a slip (the rest are the rule's answer)."""
    rng = random.Random(seed * 7 + 1)
    rows = []
    for row in sort_rows(n, seed):
        response = slip(row["answer"], rng, WRITING_SLIPS) if rng.random() < noise else row["answer"]
        rows.append({"prompt": row["prompt"], "response": response, "answer": row["answer"]})
    return rows


def comparisons(n: int, seed: int) -> list[dict[str, str]]:
    """Preference rows: the rule's answer against a slipped one, ordered by the rule's score."""
    rng = random.Random(seed * 7 + 2)
    rows = []
    for row in sort_rows(n, seed):
        a, b = row["answer"], slip(row["answer"], rng)
        if sort_score(b, row["answer"]) > sort_score(a, row["answer"]):  # never true: a is exact
            a, b = b, a
        rows.append({"prompt": row["prompt"], "chosen": a, "rejected": b})
    return rows


def ranked_pairs(rows: list[dict[str, str]], responses: list[list[str]], seed: int) -> list[dict[str, str]]:
    """One comparison per prompt from its sampled `responses`: the best against the worst by the rule.

    Prompts whose responses all score the same carry no preference and give no pair; ties for
    best or worst are broken at random (seeded).
    """
    rng = random.Random(seed)
    pairs = []
    for row, candidates in zip(rows, responses, strict=True):
        unique = [r for r in dict.fromkeys(candidates) if r.strip()]  # data rows need non-empty texts
        if len(unique) < 2:
            continue
        scored = [(sort_score(r, row["answer"]), rng.random(), r) for r in unique]
        scored.sort(reverse=True)
        (best, _, chosen), (worst, _, rejected) = scored[0], scored[-1]
        if best > worst:
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs


def write_task_data(directory: str | Path, n_train: int = 2000, n_eval: int = 200, noise: float = 0.2,
                    seed: int = 0, with_prompts: bool = True) -> dict[str, Path]:
    """Write the files of one pipeline run into `directory`; returns {name: path}.

    Each split has its own seed, so train and evaluation rows are drawn independently (with
    3-5 letters out of 8, a few short prompts recur by chance, as in real data). The prompt
    files (for PPO and the true-score evaluation) are left out with `with_prompts=False`.
    """
    d = Path(directory)
    files = {
        "sft_train": write_jsonl(demonstrations(n_train, seed + 11, noise), d / "sort_sft_train.jsonl"),
        "sft_eval": write_jsonl(demonstrations(n_eval, seed + 21, 0.0), d / "sort_sft_eval.jsonl"),
        "pairs_train": write_jsonl(comparisons(n_train, seed + 12), d / "sort_pairs_train.jsonl"),
        "pairs_eval": write_jsonl(comparisons(n_eval, seed + 22), d / "sort_pairs_eval.jsonl"),
    }
    if with_prompts:
        files["prompts_train"] = write_jsonl(sort_rows(n_train, seed + 13), d / "sort_prompts_train.jsonl")
        files["prompts_eval"] = write_jsonl(sort_rows(n_eval, seed + 23), d / "sort_prompts_eval.jsonl")
    return files


if __name__ == "__main__":
    # The shipped local configs read the prompt files sort_train/sort_eval.jsonl already there.
    target = sys.argv[1] if len(sys.argv) > 1 else "cluster_configs/local-cpu/data"
    for name, path in write_task_data(target, with_prompts=False).items():
        print(f"{name}: {path}")
