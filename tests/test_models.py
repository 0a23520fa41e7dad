"""The locally built tiny model and the policy / critic / reward-model loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from rayrlhf.models.loading import load_critic, load_policy, load_reward_model, load_tokenizer, resolve_dtype
from rayrlhf.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_tokenizer_round_trips_text_char_by_char(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny))
    text = "sort: hgfa, then 12 + 3 = 15!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id


def test_tokenizer_has_a_chat_template(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny))
    text = tok.apply_chat_template([{"role": "user", "content": "sort: cab"}], tokenize=False, add_generation_prompt=True)
    assert text == "U: sort: cab\nA: "


def test_policy_loads_and_scores_tokens(tiny: Path) -> None:
    model = load_policy(tiny, dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_in_seed(tmp_path: Path) -> None:
    a = load_policy(build_tiny_model(tmp_path / "a", seed=3))
    b = load_policy(build_tiny_model(tmp_path / "b", seed=3))
    c = load_policy(build_tiny_model(tmp_path / "c", seed=4))
    pa, pb, pc = (dict(m.named_parameters())["model.layers.0.mlp.up_proj.weight"] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_critic_gives_one_value_per_token(tiny: Path) -> None:
    from rayrlhf.models.forward import pack_batch, token_values

    critic = load_critic(tiny, dtype="float32").eval()
    batch = pack_batch([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], pad_id=0)
    with torch.no_grad():
        values = token_values(critic, batch)
        alone = token_values(critic, pack_batch([[8, 9]], [[13]], pad_id=0))
    assert values.shape == (2, 3) and values[1, 1:].eq(0).all()  # 0 on padding
    torch.testing.assert_close(values[1, :1], alone[0], atol=1e-5, rtol=0)  # padding does not change a row's values


@pytest.mark.parametrize("loader", [load_policy, load_critic, load_reward_model])
def test_dropout_in_the_config_is_switched_off(tmp_path: Path, loader) -> None:
    """With dropout, the network that scores a rollout (eval mode) and the one that is updated (train mode)
    differ, and the PPO ratio of on-policy samples is not 1."""
    from rayrlhf.models.architectures import build_architecture
    from rayrlhf.models.forward import pack_batch, sequence_scores, token_logprobs, token_values

    path = build_architecture("qwen2", tmp_path / "m", attention_dropout=0.5)
    batch = pack_batch([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], pad_id=0)
    fn = {load_policy: lambda m, b: token_logprobs(m, b)[0], load_critic: token_values, load_reward_model: sequence_scores}[loader]
    for no_dropout in (True, False):
        model = loader(path, "float32", False, no_dropout)
        with torch.no_grad():
            model.eval()
            scored = fn(model, batch)
            model.train()
            torch.manual_seed(0)
            updated = fn(model, batch)
        assert torch.equal(scored, updated) is no_dropout


def test_reward_model_gives_one_score_per_sequence_at_last_real_token(tiny: Path) -> None:
    rm = load_reward_model(tiny, dtype="float32").eval()
    pad = load_tokenizer(tiny).pad_token_id
    ids = torch.tensor([[5, 6, 7, pad, pad], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        padded = rm(input_ids=ids, attention_mask=(ids != pad).long()).logits
        alone = rm(input_ids=ids[:1, :3]).logits
    assert padded.shape == (2, 1)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


def test_critic_initialised_from_reward_model_keeps_its_head(tiny: Path, tmp_path: Path) -> None:
    rm = load_reward_model(tiny, dtype="float32")
    torch.nn.init.constant_(rm.score.weight, 0.5)
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(tiny).save_pretrained(tmp_path / "rm")
    critic = load_critic(tmp_path / "rm", dtype="float32")
    assert torch.all(critic.score.weight == 0.5)


def test_dtype_resolution_on_cpu() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") is torch.float32


def test_pack_batch_layout_and_logprobs_match_unpadded(tiny: Path) -> None:
    from rayrlhf.models.forward import pack_batch, sequence_scores, token_logprobs

    model = load_policy(tiny, dtype="float32").eval()
    pad = load_tokenizer(tiny).pad_token_id
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    batch = pack_batch(prompts, responses, pad)
    assert batch["input_ids"].shape == (2, 6) and batch["mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch, with_entropy=True)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(input_ids=torch.tensor([p + r])).logits[0].log_softmax(-1)
            expected = torch.stack([logits[len(p) - 1 + t, tok] for t, tok in enumerate(r)])
            torch.testing.assert_close(logp[i, : len(r)], expected, atol=1e-5, rtol=1e-5)
        assert logp[0, 2] == 0 and entropy[0, 2] == 0 and (entropy[1] > 0).all()
        rm = load_reward_model(tiny, dtype="float32").eval()
        scores = sequence_scores(rm, batch)
        alone = rm(input_ids=torch.tensor([prompts[0] + responses[0]])).logits[0, 0]
    torch.testing.assert_close(scores[0], alone, atol=1e-5, rtol=1e-5)
