"""Dynamic sampling in real GRPO jobs (Ray, the transformers backend, a tiny model), on-policy and asynchronous.

The reward gives 0 to every response of the prompts whose answer has 5 letters (a third of the data): those
groups are all equal and get dropped, so most steps need a second round of prompts (the asynchronous run's
reward flattens two thirds, so one step also runs out of rounds and trains short). Each run is then resumed
from its own step-2 checkpoint (as a run killed after that checkpoint would be) and must reproduce steps 3-4
exactly, refills included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from jobs import train

from rayrlhf.orchestrator.samples import read_samples

REWARD = '''
from rayrlhf.rewards.tasks import alphabet_reward

def reward(prompts, responses, answer, **_):
    """alphabet_reward, except 0 for every response to a prompt with a 5-letter answer: groups with no signal."""
    return [s if len(a) < 5 else 0.0 for s, a in zip(alphabet_reward(prompts, responses), answer)]


def harsh(prompts, responses, answer, **_):
    """Only prompts with a 3-letter answer (a third) have a signal: 3 rounds of 4 prompts often fall short."""
    return [s if len(a) < 4 else 0.0 for s, a in zip(alphabet_reward(prompts, responses), answer)]
'''

COMPARED = ("reward/mean", "kl/mean", "response/length_mean", "policy/loss", "policy/grad_norm", "data/epoch",
            "rollout/gen_rounds", "rollout/filtered_groups", "rollout/kept_groups", "rollout/drawn_reward_mean",
            "rollout/staleness_mean")


def _settings(reward: str, *extra: str) -> tuple[str, ...]:
    return (f"reward.function={reward}", "algorithm.dynamic_sampling=true", "algorithm.max_gen_batches=3",
            "schedule.steps=4", "schedule.prompts_per_step=4", "algorithm.group_size=4", "checkpoint.every=2",
            "checkpoint.keep_last=3", "data.eval=null", "rollout.dump_every=1", "rollout.micro_batch_size=8", *extra)


def _back_to_step_2(src: Path, dest: Path) -> None:
    """A copy of a finished run as it was when killed right after its step-2 checkpoint."""
    shutil.copytree(src, dest)
    shutil.rmtree(dest / "final")
    shutil.rmtree(dest / "checkpoints" / "step_4")
    (dest / "checkpoints" / "latest").write_text("step_2\n")
    for step in (3, 4):
        (dest / "samples" / f"step_{step}.jsonl").unlink()


def _check_and_resume(tmp: Path, name: str, settings: tuple[str, ...]) -> list[dict]:
    rows = train("cluster_configs/local-cpu/grpo.yaml", tmp, name, *settings)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert any(r["rollout/gen_rounds"] > 1 for r in rows)
    assert sum(r["rollout/filtered_groups"] for r in rows) > 0
    for r in rows:
        assert 1 <= r["rollout/gen_rounds"] <= 3
        assert r["rollout/drawn_groups"] == 4 * r["rollout/gen_rounds"]
        assert r["rollout/kept_groups"] <= 4 and r["rollout/samples"] == 4 * r["rollout/kept_groups"]
        # the rounds stopped as soon as the step was full; a full step says so
        assert (r["rollout/informative_frac"] == 1) == (r["rollout/kept_groups"] == 4)
        if r["rollout/gen_rounds"] < 3:
            assert r["rollout/informative_frac"] == 1
        samples = read_samples(tmp / name / "samples" / f"step_{r['step']}.jsonl")
        assert len(samples) == r["rollout/samples"]
        groups: dict[int, list[dict]] = {}
        for s in samples:
            groups.setdefault(s["position"], []).append(s)
        assert len(groups) == r["rollout/kept_groups"]
        for position, group in groups.items():  # only informative groups were trained on
            assert len({s["score"] for s in group}) > 1, (r["step"], position)
            assert any(s["advantage"] != 0 for s in group), (r["step"], position)
            assert all(s["request_id"] == f"s{r['step']}-p{position}" for s in group)
        assert max(groups) < 4 * r["rollout/gen_rounds"]

    _back_to_step_2(tmp / name, tmp / f"{name}-resumed")
    resumed = train("cluster_configs/local-cpu/grpo.yaml", tmp, f"{name}-resumed", *settings, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows, resumed, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, a["step"], key)
    for step in (3, 4):  # the very same samples, refills included
        mine = [(s["request_id"], s["sample_index"], s["turns"][0]["text"], s["score"])
                for s in read_samples(tmp / name / "samples" / f"step_{step}.jsonl")]
        again = [(s["request_id"], s["sample_index"], s["turns"][0]["text"], s["score"])
                 for s in read_samples(tmp / f"{name}-resumed" / "samples" / f"step_{step}.jsonl")]
        assert mine == again
    return rows


@pytest.fixture
def reward(tmp_path: Path) -> Path:
    path = tmp_path / "some_groups_flat.py"
    path.write_text(REWARD)
    return path


def test_dynamic_sampling_refills_and_resumes_exactly_on_policy(ray_local: None, tmp_path: Path, reward: Path) -> None:
    rows = _check_and_resume(tmp_path, "on-policy", _settings(f"{reward}:reward"))
    assert all(r["rollout/staleness_max"] == 0 for r in rows)


def test_dynamic_sampling_refills_and_resumes_exactly_asynchronously(ray_local: None, tmp_path: Path, reward: Path) -> None:
    rows = _check_and_resume(tmp_path, "async", _settings(f"{reward}:harsh", "schedule.max_staleness=1"))
    # A step's first round was launched a step ahead (weights step - 2); a refill samples with the weights of its
    # own time (step - 1), so it is never stale.
    refills = 0
    for r in rows:
        for s in read_samples(tmp_path / "async" / "samples" / f"step_{r['step']}.jsonl"):
            refill = s["position"] >= 4
            refills += refill
            assert s["weight_version"] == (r["step"] - 1 if refill else max(r["step"] - 2, 0)), s["request_id"]
    assert refills > 0
    # 3 rounds of 4 prompts where two thirds have no signal: some step falls short, says so, and still trains
    short = [r for r in rows if r["rollout/informative_frac"] < 1]
    assert short and all(r["rollout/gen_rounds"] == 3 and r["policy/loss"] is not None for r in short)
