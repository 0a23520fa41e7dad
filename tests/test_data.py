"""Data loading: formats (jsonl, parquet, Hugging Face datasets), row checks that name file and line,
conversation rows, overlong prompts, resumable order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayrlhf.config import load_config
from rayrlhf.data.datasets import (
    PromptDataset,
    encode_prompt,
    format_prompt,
    load_prompts,
    load_rows,
    reward_columns,
    row_messages,
)
from rayrlhf.errors import InvalidInput
from rayrlhf.models.forward import pack_batch
from rayrlhf.models.tiny import build_tokenizer
from rayrlhf.models.tiny_chat import build_chat_tokenizer


def jsonl(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_read_the_same_rows(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "z", "rejected": "w"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    from_jsonl = load_rows(str(jsonl(tmp_path, rows)), "pairs")
    from_parquet = load_rows(str(tmp_path / "d.parquet"), "pairs")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "_where"} for r in rs]  # noqa: E731
    assert strip(from_jsonl) == strip(from_parquet) == rows


@pytest.mark.parametrize(
    ("rows", "kind", "pattern"),
    [
        ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], "sft", r"d\.jsonl, line 2: missing field 'response'"),
        ([{"prompt": "a"}, {"prompt": ""}], "prompt", r"line 2: field 'prompt' is empty"),
        ([{"prompt": 3}], "prompt", r"line 1: field 'prompt' must be a string, got int"),
        (['{"prompt": "a"}', "{not json"], "prompt", r"line 2: not valid JSON"),
        (["[1, 2]"], "prompt", r"line 1: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, rows: list, kind: str, pattern: str) -> None:
    with pytest.raises(InvalidInput, match=pattern):
        load_rows(str(jsonl(tmp_path, rows)), kind)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), "prompt")


def test_prompts_use_the_chat_template_and_overlong_ones_error_or_drop(tmp_path: Path) -> None:
    tok = build_tokenizer()
    path = str(jsonl(tmp_path, [{"prompt": "ab", "answer": "ab"}, {"prompt": "x" * 40, "answer": "x"}]))
    with pytest.raises(InvalidInput, match=r"d\.jsonl, line 2: the prompt is 47 tokens, over data\.max_prompt_tokens = 20"):
        load_prompts(path, tok, 20, "error", apply_chat_template=True, seed=0)
    data = load_prompts(path, tok, 20, "drop", apply_chat_template=True, seed=0)
    assert len(data) == 1 and data.dropped == 1
    assert tok.decode(data.prompt_ids[0]) == "U: ab\nA: "
    assert reward_columns(data.rows) == {"answer": ["ab"]}


def test_order_is_seeded_reshuffled_per_epoch_and_resumable() -> None:
    rows = [{"prompt": str(i)} for i in range(5)]
    data = PromptDataset(rows, [[i] for i in range(5)], seed=7)
    first = data.next_batch(5)
    assert sorted(first) == list(range(5))
    second = data.next_batch(5)
    assert sorted(second) == list(range(5)) and second != first
    data2 = PromptDataset(rows, [[i] for i in range(5)], seed=7)
    assert data2.next_batch(3) + data2.next_batch(3) == first + second[:1]
    state = data2.state_dict()
    resumed = PromptDataset(rows, [[i] for i in range(5)], seed=7)
    resumed.load_state_dict(state)
    assert resumed.next_batch(4) == data2.next_batch(4)


# ------------------------------------------------------------------------- conversations as data
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: ba"}]


def test_conversation_rows_render_with_the_template_and_keep_their_columns(tmp_path: Path) -> None:
    tok = build_chat_tokenizer("chatml")
    path = str(jsonl(tmp_path, [{"messages": CHAT, "answer": "ab"}, {"prompt": "sort: dc", "answer": "cd"}]))
    data = load_prompts(path, tok, 100, "error", apply_chat_template=True, seed=0)
    assert tok.decode(data.prompt_ids[0]) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsort: ba"
                                              "<|im_end|>\n<|im_start|>assistant\n")
    assert data.prompt_ids[1] == encode_prompt(tok, format_prompt(tok, "sort: dc", True))  # plain rows as before
    # reward functions get the last user message as the prompt, and the conversation as a column
    assert [r["prompt"] for r in data.rows] == ["sort: ba", "sort: dc"]
    assert reward_columns(data.rows) == {"messages": [CHAT, None], "answer": ["ab", "cd"]}
    assert row_messages(data.rows[1]) == [{"role": "user", "content": "sort: dc"}]


def test_tools_reach_the_template_from_the_row_or_the_environment(tmp_path: Path) -> None:
    tok = build_chat_tokenizer("chatml")
    tool = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {}}}}
    path = str(jsonl(tmp_path, [{"messages": CHAT, "tools": [tool]}, {"prompt": "2+2?"}]))
    data = load_prompts(path, tok, 400, "error", apply_chat_template=True, seed=0)
    assert '"name": "calc"' in tok.decode(data.prompt_ids[0]) and "calc" not in tok.decode(data.prompt_ids[1])
    # every row has every column, so a reward function gets the same arguments whatever rows a batch holds
    assert reward_columns(data.rows[1:]) == {"messages": [None], "tools": [None]}
    env_tool = {"type": "function", "function": {"name": "python"}}
    data = load_prompts(path, tok, 400, "error", apply_chat_template=True, seed=0, tools=[env_tool])
    assert '"name": "calc"' in tok.decode(data.prompt_ids[0]) and '"name": "python"' in tok.decode(data.prompt_ids[1])
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(InvalidInput, match=r"d\.jsonl, line 1: the tokenizer .* has no chat template .* no format for tools"):
        load_prompts(path, plain, 400, "error", apply_chat_template=True, seed=0)


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([{"prompt": "a"}, {"prompt": "b", "messages": CHAT}], r"line 2: has both 'messages' and 'prompt'"),
        ([{"messages": "hello"}], r"line 1: field 'messages' is a string but not valid JSON"),
        ([{"messages": [{"role": "user"}]}], r"line 1: messages\[0\] has no 'content'"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], r"line 1: messages\[0\]: unknown role 'bot'"),
        ([{"messages": [{"role": "user", "content": ["x"]}]}], r"line 1: messages\[0\]: 'content' must be a string, got list"),
        ([{"messages": CHAT, "tools": {"name": "f"}}], r"line 1: field 'tools' must be a list of tool schemas"),
        ([{"messages": CHAT, "tools": ["f"]}], r"line 1: tools\[0\] must be a JSON object"),
        ([{"messages": [*CHAT, {"role": "assistant", "content": "ab"}]}], r"line 1: the last message of 'messages' is an assistant"),
        ([{"answer": "x"}], r"line 1: missing field 'prompt' \(rows need prompt, or messages\)"),
    ],
)
def test_bad_conversation_rows_name_file_and_line(tmp_path: Path, rows: list, pattern: str) -> None:
    with pytest.raises(InvalidInput, match=pattern):
        load_rows(str(jsonl(tmp_path, rows)), "prompt")


def test_the_prompt_and_messages_columns_are_configurable(tmp_path: Path) -> None:
    path = str(jsonl(tmp_path, [{"question": "q1", "id": 1}, {"chat": CHAT, "id": 2}]))
    rows = load_rows(path, "prompt", prompt_key="question", messages_key="chat")
    assert [r["prompt"] for r in rows] == ["q1", "sort: ba"] and rows[1]["messages"] == CHAT
    assert "question" not in rows[0] and "chat" not in rows[1]
    with pytest.raises(InvalidInput, match=r"line 1: missing field 'query' \(rows need query, or chat\)"):
        load_rows(path, "prompt", prompt_key="query", messages_key="chat")
    clash = str(jsonl(tmp_path, [{"question": "q", "prompt": "p"}], "clash.jsonl"))
    with pytest.raises(InvalidInput, match=r"line 1: has a column 'prompt' while data.prompt_key is 'question'"):
        load_rows(clash, "prompt", prompt_key="question")
    with pytest.raises(ValueError, match="data.prompt_key and data.messages_key are both 'x'"):
        load_config(None, ["data.prompt_key=x", "data.messages_key=x"])


def test_parquet_with_prompt_and_conversation_rows_reads_nulls_as_absent(tmp_path: Path) -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    rows = [{"prompt": "p", "messages": None},
            {"prompt": None, "messages": [{"role": "user", "content": "u"},
                                          {"role": "assistant", "content": "", "tool_calls": [call]},
                                          {"role": "tool", "content": "r", "name": "f"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mixed.parquet")
    loaded = load_rows(str(tmp_path / "mixed.parquet"), "prompt")
    assert "messages" not in loaded[0] and loaded[0]["prompt"] == "p"
    assert loaded[1]["messages"] == [{"role": "user", "content": "u"},  # no null name / tool_calls keys
                                     {"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "tool", "content": "r", "name": "f"}]


# ----------------------------------------------------------------------------- Hugging Face datasets
def test_datasets_saved_to_disk_load_by_folder_and_split(tmp_path: Path) -> None:
    import datasets

    train = [{"messages": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(3)]
    test = [{"prompt": "held out", "answer": "x"}]
    datasets.Dataset.from_list(train).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
                         ).save_to_disk(str(tmp_path / "dict"))
    single = load_rows(str(tmp_path / "single"), "prompt")
    assert [r["prompt"] for r in single] == ["q0", "q1", "q2"] and single[2]["_where"] == f"{tmp_path / 'single'}, row 3"
    assert [r["answer"] for r in load_rows(str(tmp_path / "dict"), "prompt")] == ["0", "1", "2"]  # train by default
    assert load_rows(f"{tmp_path / 'dict'}@test", "prompt")[0]["prompt"] == "held out"
    with pytest.raises(InvalidInput, match=r"no split 'dev' in this DatasetDict; its splits are \['test', 'train'\]"):
        load_rows(f"{tmp_path / 'dict'}@dev", "prompt")
    with pytest.raises(InvalidInput, match=r"holds a single Dataset, which has no splits \(drop '@test'\)"):
        load_rows(f"{tmp_path / 'single'}@test", "prompt")
    with pytest.raises(InvalidInput, match="no such file or dataset folder"):
        load_rows(f"{tmp_path / 'missing'}@train", "prompt")


def test_dataset_configurations_and_splits_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`name:config@split`, on a local folder of data files whose README declares two configurations
    (the same loader as a hub dataset, without the network)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "task"
    folder.mkdir()
    jsonl(folder, [{"prompt": "easy one"}], "easy.jsonl")
    jsonl(folder, [{"prompt": "hard one"}, {"prompt": "hard two"}], "hard_train.jsonl")
    jsonl(folder, [{"prompt": "hard test"}], "hard_test.jsonl")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: easy\n  data_files: easy.jsonl\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard_train.jsonl\n"
        "  - split: test\n    path: hard_test.jsonl\n---\n")
    assert [r["prompt"] for r in load_rows(f"{folder}:hard", "prompt")] == ["hard one", "hard two"]
    assert [r["prompt"] for r in load_rows(f"{folder}:hard@test", "prompt")] == ["hard test"]
    assert [r["prompt"] for r in load_rows(f"{folder}:easy@train", "prompt")] == ["easy one"]
    with pytest.raises(InvalidInput, match=r"task:nope: cannot load dataset"):
        load_rows(f"{folder}:nope", "prompt")


# ------------------------------------------------------------------------------ SFT on conversations
SFT_CHAT = [{"role": "user", "content": "sort: cab"}, {"role": "assistant", "content": "abc"},
            {"role": "user", "content": "and ba?"}, {"role": "assistant", "content": "ab"},
            {"role": "user", "content": "thanks"}]


def test_sft_conversations_train_on_assistant_tokens_only(tmp_path: Path) -> None:
    from rayrlhf.data.examples import load_examples

    tok = build_tokenizer()
    data = load_config(None, ["algorithm.name=sft", "data.max_prompt_tokens=16"]).data
    path = jsonl(tmp_path, [{"messages": SFT_CHAT}, {"prompt": "sort: ba", "response": "ab"}])
    conversation, plain = load_examples(str(path), "sft", tok, data)[0]
    assert tok.decode(conversation.prompt_ids) == "U: sort: cab\nA: "
    assert tok.decode(conversation.responses[0]) == "abc</s>\nU: and ba?\nA: ab</s>"  # up to the last trained token
    trained = [i for i, m in zip(conversation.responses[0], conversation.loss_mask) if m]
    assert tok.decode(trained) == "abc</s>ab</s>"
    assert plain.loss_mask is None and tok.decode(plain.responses[0]) == "ab</s>"
    batch = pack_batch([e.prompt_ids for e in (conversation, plain)], [e.responses[0] for e in (conversation, plain)],
                       tok.pad_token_id, masks=[conversation.loss_mask, plain.loss_mask])
    assert batch["mask"][0].tolist() == [float(m) for m in conversation.loss_mask]
    assert batch["mask"][1].tolist()[:3] == [1.0, 1.0, 1.0] and batch["mask"][1].sum() == 3
    bad = [{"messages": [{"role": "user", "content": "a"}]}]
    with pytest.raises(InvalidInput, match=r"line 1: 'messages' has no assistant message to train on"):
        load_examples(str(jsonl(tmp_path, bad, "bad.jsonl")), "sft", tok, data)
    both = [{"messages": SFT_CHAT, "response": "x"}]
    with pytest.raises(InvalidInput, match=r"line 1: has both 'messages' and 'response'"):
        load_examples(str(jsonl(tmp_path, both, "both.jsonl")), "sft", tok, data)
    long = [{"messages": [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(InvalidInput, match=r"line 1: the prompt is 37 tokens, over data\.max_prompt_tokens = 16"):
        load_examples(str(jsonl(tmp_path, long, "long.jsonl")), "sft", tok, data)


def test_sft_loss_on_a_conversation_is_the_nll_of_its_assistant_tokens(tiny_model: Path, tmp_path: Path) -> None:
    """The trainer's sft loss (micro-batches, padding trimmed) on a real tiny model equals the NLL of the
    assistant tokens computed by hand on the unpadded sequences."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayrlhf.actors.losses_step import count_units, plan_passes
    from rayrlhf.data.examples import load_examples
    from rayrlhf.models.forward import token_logprobs

    tok = build_tokenizer()
    data = load_config(None, ["algorithm.name=sft"]).data
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    examples, _ = load_examples(str(jsonl(tmp_path, [{"messages": SFT_CHAT}, {"messages": short}])), "sft", tok, data)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    batch = pack_batch([e.prompt_ids for e in examples], [e.responses[0] for e in examples], tok.pad_token_id,
                       masks=[e.loss_mask for e in examples])
    args = {"agg": "token-mean"}
    totals = count_units("sft", batch, args)

    def forward(packed: dict, with_entropy: bool, temperature: float) -> dict:
        return {"logp": token_logprobs(model, packed, temperature)[0]}

    with torch.no_grad():
        loss = sum(float(p(forward, totals).loss) for p in plan_passes("sft", batch, args, micro_batch_size=1))
        nll, count = 0.0, 0
        for e in examples:
            ids = torch.tensor([e.prompt_ids + e.responses[0]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            for t, m in enumerate(e.loss_mask):
                pos = len(e.prompt_ids) + t
                if m:
                    nll, count = nll - float(logp[pos - 1, ids[0, pos]]), count + 1
    assert count == 10  # "abc</s>" + "ab</s>" + "yo</s>"
    assert loss == pytest.approx(nll / count, rel=1e-5)


def test_an_sft_job_on_conversations_packs_masked_batches(tmp_path: Path) -> None:
    """The offline trainer's data side (no actor starts in its constructor): messages rows become
    batches whose mask is 1 on assistant tokens only, in training and in evaluation."""
    from rayrlhf.orchestrator.offline import OfflineTrainer

    path = jsonl(tmp_path, [{"messages": SFT_CHAT}, {"messages": SFT_CHAT[:2]}])
    cfg = load_config(None, ["algorithm.name=sft", f"data.train={path}", f"data.eval={path}",
                             f"output_dir={tmp_path / 'out'}", "schedule.prompts_per_step=2"])
    job = OfflineTrainer(cfg)
    batch = job._batch(job.train)
    tok = job.tokenizer
    trained = [tok.decode(batch["input_ids"][i, -batch["mask"].shape[1]:][batch["mask"][i] > 0]) for i in range(2)]
    assert trained == ["abc</s>ab</s>", "abc</s>"]
    assert len(job.eval) == 2 and job._sft_batch(job.eval)["mask"].sum() == 11
