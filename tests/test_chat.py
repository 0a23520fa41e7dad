"""Conversations: message checks, rendering with tools, and token-exact multi-turn assembly.

The property at the heart of it: on a prefix-stable template, prompt ids + each turn's sampled ids
+ the suffix `turn_suffix_ids` appends equal the tokenization of the whole conversation rendered
at once, and the mask-1 tokens are exactly what the policy sampled. The character tokenizers make
that tokenization unambiguous (one character, one token), so equality is exact.
"""

from __future__ import annotations

import random
import string

import pytest

from rayrlhf.data.chat import (
    PROBE_TOOL,
    ChatFormat,
    EpisodeTokens,
    chat_format,
    check_messages,
    check_prefix_stable,
    check_tools,
    prompt_ids,
    prompt_text,
    turn_suffix_ids,
)
from rayrlhf.errors import InvalidInput
from rayrlhf.models.tiny import build_tokenizer
from rayrlhf.models.tiny_chat import build_chat_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TEXT_CHARS = string.ascii_letters + string.digits + " .,:;!?()[]{}'\"-_=+*/\n"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ({"role": "user"}, r"row 1: field 'messages' must be a non-empty list .* got dict"),
        ([], r"got an empty list"),
        ("[1", r"field 'messages' is a string but not valid JSON"),
        (["hi"], r"messages\[0\] must be an object with 'role' and 'content', got str"),
        ([{"content": "x"}], r"messages\[0\] has no 'role'"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]: unknown role 'robot' \(roles are system, user, assistant, tool\)"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([user("a"), {"role": "user", "content": 3}], r"messages\[1\]: 'content' must be a string, got int"),
        ([{"role": "user", "content": "a", "tool_calls": []}], r"messages\[0\]: only assistant messages carry 'tool_calls'"),
        ([user("a"), {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}, user("b")],
         r"messages\[1\]\.tool_calls\[0\]: needs a function name"),
        ([user("a"), {"role": "assistant", "tool_calls": [{"name": "f", "arguments": 3}]}, user("b")],
         r"'arguments' must be an object or a JSON string, got int"),
        ([{"role": "tool", "content": "r", "tool_call_id": 7}], r"messages\[0\]: 'tool_call_id' must be a string"),
        ([user("a"), assistant("b")], r"row 1: the last message of 'messages' is an assistant message"),
    ],
)
def test_malformed_messages_name_the_row_and_the_item(value: object, pattern: str) -> None:
    with pytest.raises(InvalidInput, match=pattern):
        check_messages(value, "d.parquet, row 1")


def test_messages_are_normalised() -> None:
    raw = ('[{"role": "system", "content": "s", "name": null}, {"role": "user", "content": "q", "tool_calls": null},'
           ' {"role": "assistant", "content": null, "tool_calls": [{"name": "f", "arguments": "{\\"a\\": 1}"}]},'
           ' {"role": "tool", "content": "r", "name": "f", "tool_call_id": "c1"}]')
    out = check_messages(raw, "x")  # a JSON string, null-filled keys (as columnar files write them)
    assert out == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "r", "name": "f", "tool_call_id": "c1"},
    ]
    assert check_messages([user("a"), assistant("b")], "x", prompt=False)[-1] == assistant("b")
    assert prompt_text(out) == "q" and prompt_text([{"role": "system", "content": "only"}]) == "only"


def test_tools_are_checked() -> None:
    assert check_tools([WEATHER, {"name": "bare"}], "x") == [WEATHER, {"name": "bare"}]
    assert check_tools('[{"name": "bare"}]', "x") == [{"name": "bare"}]
    with pytest.raises(InvalidInput, match=r"x: field 'tools' must be a list of tool schemas .* got dict"):
        check_tools(WEATHER, "x")
    with pytest.raises(InvalidInput, match=r"x: tools\[1\] must be a JSON object"):
        check_tools([WEATHER, "weather"], "x")
    with pytest.raises(InvalidInput, match=r"x: tools\[0\] has no function name"):
        check_tools([{"type": "function", "function": {"parameters": {}}}], "x")


# -------------------------------------------------------------------------------- templates
def test_each_template_is_probed_for_its_end_of_turn_tools_and_stability() -> None:
    tiny, chatml, headers, think = (build_tokenizer(), build_chat_tokenizer("chatml"), build_chat_tokenizer("headers"),
                                    build_chat_tokenizer("chatml-think"))
    f = ChatFormat(tiny)  # "A: content\n": no end-of-turn token in the template, so EOS is the stop token; tools: one line
    assert (f.plain, f.takes_tools, f.eot_id, f.eot_rendered, f.after_eot, f.stable) == (
        False, True, tiny.eos_token_id, False, "\n", True)
    f = ChatFormat(chatml)
    assert (f.takes_tools, f.eot_text, f.after_eot, f.stable) == (True, "<|im_end|>", "\n", True)
    assert f.eot_id == chatml.convert_tokens_to_ids("<|im_end|>") != chatml.eos_token_id
    f = ChatFormat(headers)
    assert (f.takes_tools, f.eot_text, f.after_eot, f.stable) == (True, "<|eot_id|>", "", True)
    f = ChatFormat(think)
    assert not f.takes_tools and f.eot_text == "<|im_end|>"
    assert "appending turns after message 4 changes the earlier text" in f.unstable_reason
    assert check_prefix_stable(think) == f.unstable_reason and check_prefix_stable(chatml, [WEATHER]) is None
    assert chat_format(chatml) is chat_format(chatml) is not chat_format(chatml, use_template=False)


def test_prompts_render_tools_only_where_the_template_does() -> None:
    chatml = build_chat_tokenizer("chatml")
    ids = prompt_ids(chatml, [user("hot?")], [WEATHER])
    text = chatml.decode(ids)
    assert text.startswith("<|im_start|>system\nTools you may call") and '"name": "weather"' in text
    assert text.endswith("<|im_start|>user\nhot?<|im_end|>\n<|im_start|>assistant\n")
    assert ids == encode(chatml, chatml.apply_chat_template([user("hot?")], tools=[WEATHER], tokenize=False,
                                                            add_generation_prompt=True))
    with pytest.raises(InvalidInput, match="does not render tools"):
        prompt_ids(build_chat_tokenizer("chatml-think"), [user("hot?")], [WEATHER])
    assert build_tokenizer().decode(prompt_ids(build_tokenizer(), [user("hot?")], [WEATHER])) == "S: tools weather\nU: hot?\nA: "


def test_without_a_template_conversations_render_plainly_and_tools_are_refused() -> None:
    tok = build_tokenizer()
    tok.chat_template = None
    messages = [{"role": "system", "content": "be brief"}, user("hi"), assistant("yo"), user("sort: ba")]
    assert tok.decode(prompt_ids(tok, messages)) == "system: be brief\nuser: hi\nassistant: yo</s>\nuser: sort: ba\nassistant: "
    f = chat_format(tok)
    assert (f.plain, f.eot_id, f.after_eot) == (True, tok.eos_token_id, "\n")
    with pytest.raises(InvalidInput, match="has no chat template .* no format for tools or tool turns"):
        prompt_ids(tok, [user("a"), assistant("b"), {"role": "tool", "content": "r"}])
    with pytest.raises(InvalidInput, match="no format for tools"):
        prompt_ids(tok, [user("a")], [WEATHER])
    chatml = build_chat_tokenizer("chatml")  # data.apply_chat_template: false renders plainly too
    assert chatml.decode(prompt_ids(chatml, [user("hi")], use_template=False)) == "user: hi\nassistant: "


def test_a_template_that_cannot_render_a_conversation_is_invalid_input() -> None:
    tok = build_chat_tokenizer("chatml")
    tok.chat_template = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}" \
                        "{% endif %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    with pytest.raises(InvalidInput, match=r"cannot render this conversation \(TemplateError: no tools here\)"):
        prompt_ids(tok, [user("a"), assistant("b"), {"role": "tool", "content": "r"}])


# --------------------------------------------------------------------------- turn suffixes
def test_suffix_after_a_stopped_a_cut_and_a_last_turn() -> None:
    tok = build_chat_tokenizer("chatml")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    history, more = [user("hi")], [user("more")]
    stopped = turn_suffix_ids(tok, history, encode(tok, "yo") + [im_end], more)
    assert tok.decode(stopped) == "\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
    cut = turn_suffix_ids(tok, history, encode(tok, "yo"), more)
    assert cut == [im_end] + stopped
    assert tok.decode(turn_suffix_ids(tok, history, encode(tok, "yo") + [im_end], [], next_turn=False)) == "\n"
    assert turn_suffix_ids(tok, history, encode(tok, "yo"), [], next_turn=False) == [im_end] + encode(tok, "\n")
    tools = turn_suffix_ids(tok, history, [im_end], [{"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}])
    assert tok.decode(tools) == ("\n<|im_start|>user\n<tool_result>1</tool_result>\n<tool_result>2</tool_result>"
                                 "<|im_end|>\n<|im_start|>assistant\n")
    headers = build_chat_tokenizer("headers")
    eot = headers.convert_tokens_to_ids("<|eot_id|>")
    assert turn_suffix_ids(headers, history, [eot], [], next_turn=False) == []
    assert headers.decode(turn_suffix_ids(headers, history, [], [{"role": "tool", "content": "7"}])) == (
        "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n7<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    tiny = build_tokenizer()  # the policy's </s> ends the turn; the template's "\n" follows it
    assert tiny.decode(turn_suffix_ids(tiny, history, encode(tiny, "yo") + [tiny.eos_token_id], more)) == "\nU: more\nA: "
    assert tiny.decode(turn_suffix_ids(tiny, history, encode(tiny, "yo"), more)) == "</s>\nU: more\nA: "


def random_text(rng: random.Random, low: int = 1, high: int = 12) -> str:
    return "".join(rng.choice(TEXT_CHARS) for _ in range(rng.randint(low, high)))


def random_observation(rng: random.Random, tools: bool) -> list[dict]:
    kinds = ["user", "tool", "tool"] if tools else ["user"]
    return [{"role": rng.choice(kinds), "content": random_text(rng)} for _ in range(rng.randint(1, 3))]


def play_episode(tok, rng: random.Random, tools: list | None) -> tuple[EpisodeTokens, list[dict], list[list[int]]]:
    """A random episode played through `EpisodeTokens` as the rollout worker would: sampled ids are the
    text's ids plus the end-of-turn token, or without it (cut at the budget). Returns the episode, the
    conversation as messages, and each turn's sampled ids."""
    fmt = chat_format(tok)
    start = ([{"role": "system", "content": random_text(rng)}] if rng.random() < 0.5 else []) + [user(random_text(rng))]
    episode = EpisodeTokens.start(fmt, start, tools)
    messages, turns = list(start), []
    n_turns = rng.randint(1, 4)
    for t in range(n_turns):
        text = random_text(rng, 0)
        sampled = encode(tok, text) + ([fmt.eot_id] if rng.random() < 0.7 else [])
        last = t == n_turns - 1
        observation = [] if last else random_observation(rng, bool(tools))
        episode.add_turn(sampled, observation, next_turn=not last)
        messages += [assistant(text), *observation]
        turns.append(sampled)
    return episode, messages, turns


@pytest.mark.parametrize(("style", "with_tools"), [("chatml", False), ("chatml", True), ("headers", False),
                                                   ("headers", True)])
def test_turn_by_turn_ids_equal_the_whole_conversation_rendered_at_once(style: str, with_tools: bool) -> None:
    tok = build_chat_tokenizer(style)
    fmt = chat_format(tok)
    rng = random.Random(f"{style}-{with_tools}")
    tools = [WEATHER] if with_tools else None
    for _ in range(40):
        episode, messages, turns = play_episode(tok, rng, tools)
        whole = tok.apply_chat_template(messages, tools=tools, tokenize=False) if tools else \
            tok.apply_chat_template(messages, tokenize=False)
        assert episode.ids == encode(tok, whole)
        assert [i for i, m in zip(episode.ids, episode.mask) if m] == [i for s in turns for i in s]
        assert len(episode.ids) == len(episode.mask)
        # SFT on the same conversation trains on the same tokens, each turn ending with its end-of-turn token
        ids, mask = fmt.conversation_ids(messages, tools)
        assert ids == episode.ids
        want = [i for s in turns for i in (s if s and s[-1] == fmt.eot_id else [*s, fmt.eot_id])]
        assert [i for i, m in zip(ids, mask) if m] == want


def test_on_the_tiny_template_the_policy_stop_token_sits_before_the_template_closing() -> None:
    tok = build_tokenizer()
    rng = random.Random(3)
    for _ in range(20):
        episode, messages, _ = play_episode(tok, rng, None)
        marked = [{**m, "content": m["content"] + "</s>"} if m["role"] == "assistant" else m for m in messages]
        assert episode.ids == encode(tok, tok.apply_chat_template(marked, tokenize=False))
        assert episode.ids == chat_format(tok).conversation_ids(messages)[0]


def test_structured_tool_calls_train_on_the_rendered_call() -> None:
    tok = build_chat_tokenizer("chatml")
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    messages = [user("weather in Oslo?"), {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "cold"}, assistant("It is cold."), user("thanks")]
    ids, mask = chat_format(tok).conversation_ids(messages, [WEATHER])
    whole = tok.apply_chat_template(messages[:-1], tools=[WEATHER], tokenize=False)  # nothing after the last reply
    assert ids == encode(tok, whole)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == (
        '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>It is cold.<|im_end|>')
    with pytest.raises(InvalidInput, match="needs an assistant message after at least one other message"):
        chat_format(tok).conversation_ids([assistant("hi"), user("x")])


def test_an_unstable_template_falls_back_to_rendering_each_piece_alone() -> None:
    tok = build_chat_tokenizer("chatml-think")
    fmt = chat_format(tok)
    assert not fmt.stable
    im_end = fmt.eot_id
    history = [user("q1"), assistant("<think>a</think>x"), user("q2")]
    sampled = encode(tok, "<think>long reasoning</think>answer") + [im_end]
    suffix = turn_suffix_ids(tok, history, sampled, [user("q3")])
    assert tok.decode(suffix) == "\n<|im_start|>user\nq3<|im_end|>\n<|im_start|>assistant\n"
    # SFT trains on what the policy writes, reasoning included, although a fresh render drops earlier reasoning
    messages = [user("q1"), assistant("<think>r1</think>a1"), user("q2"), assistant("<think>r2</think>a2")]
    ids, mask = fmt.conversation_ids(messages)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "<think>r1</think>a1<|im_end|><think>r2</think>a2<|im_end|>"
    assert tok.decode(ids) == ("<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n<think>r1</think>a1<|im_end|>\n"
                               "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>r2</think>a2<|im_end|>\n")
    assert tok.decode(ids) != tok.apply_chat_template(messages, tokenize=False)


def test_probe_tool_is_a_valid_schema() -> None:
    assert check_tools([PROBE_TOOL], "probe") == [PROBE_TOOL]


def test_on_a_bpe_tokenizer_the_assembled_ids_decode_to_the_whole_render() -> None:
    """With merges, ids tokenized piece by piece may differ from the whole text's tokenization at the seams
    (that is what the policy samples, so it is kept), but they decode to exactly the whole render."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rayrlhf.models.tiny_chat import CHATML_TEMPLATE

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    rng = random.Random(11)
    corpus = [random_text(rng, 5, 60) for _ in range(300)] + ["the weather is cold today\n\n" * 3]
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="</s>")
    tok.chat_template = CHATML_TEMPLATE
    assert chat_format(tok).stable
    for _ in range(30):
        episode, messages, turns = play_episode(tok, rng, [WEATHER])
        assert tok.decode(episode.ids) == tok.apply_chat_template(messages, tools=[WEATHER], tokenize=False)
        assert [i for i, m in zip(episode.ids, episode.mask) if m] == [i for s in turns for i in s]
