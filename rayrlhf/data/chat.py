"""Conversations: checking them, rendering them, and their token ids, token-exactly.

One mechanism serves three uses:

- a prompt (online RL) is the conversation rendered with the generation prompt;
- SFT on a conversation trains on the assistant turns only;
- a multi-turn rollout appends, after each sampled assistant turn, the ids of what the template
  puts after it (the end of the turn, the observation turns, the next generation prompt).

Every piece is the DIFFERENCE of two renders of the conversation, tokenized alone; earlier
turns are never decoded and re-encoded, so the ids the policy sampled stay the ids it is trained
on. A turn is `<generation prompt><body><end-of-turn token><rest of the closing>`: the policy
samples the body and the end-of-turn token (mask 1, and what SFT trains), the template supplies
the rest (mask 0). The end-of-turn token is the special token the template closes an assistant
message with (`<|im_end|>`, `<|eot_id|>`, `</s>`), or, when the closing starts with no special
token (the tiny test template), the tokenizer's EOS, which the rollout stops on and which is then
inserted before the closing: SFT, rollouts and the prompt/response SFT path (response + EOS)
all agree.

A template is *prefix-stable* when rendering a conversation and then appending turns only adds
text at the end. With a stable template, the ids assembled turn by turn equal the tokenization of
the whole conversation rendered at once (tests/test_chat.py checks it on three templates). An
unstable one (e.g. one that drops the reasoning of earlier assistant turns, or adds an empty
think block only to the last one) cannot satisfy that; then each assistant body and each
observation is rendered after a fixed one-exchange context instead of the real history (cheap,
the same for every episode), which is what the policy then sees; `ChatFormat.unstable_reason`
says why, for a warning.

No chat template (or `data.apply_chat_template: false`): the plain rendering is
"<role>: <content>\\n" per message, an assistant message is "assistant: <content><EOS>\\n", and
the generation prompt is "assistant: ". It has no format for tools or tool turns: a conversation
with them is an InvalidInput.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass
from typing import Any

from rayrlhf.errors import InvalidInput

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, Any]

# Stands in for an assistant turn's body so the text around it can be located in a render.
_SENTINEL = "RAYRLHF-BODY-7e3c1"
# A tool schema whose name appears in a render only if the template renders `tools`.
PROBE_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "rayrlhf_probe_tool", "description": "Probe.",
    "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "Probe."}},
                   "required": ["q"]}}}
_CONTEXT: list[Message] = [{"role": "user", "content": "."}]  # the fixed context of unstable templates


# ------------------------------------------------------------------------------------- checks
def _json_value(value: Any, where: str, key: str) -> Any:
    """Columnar files (parquet, datasets) often hold nested data as a JSON string: decode it."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{where}: field '{key}' is a string but not valid JSON ({exc.msg})") from None
    return value


def _tool_call(call: Any, at: str) -> dict[str, Any]:
    """One assistant tool call in the Hugging Face form {"type": "function", "function": {name, arguments}}."""
    if not isinstance(call, dict):
        raise InvalidInput(f"{at}: must be an object, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidInput(f"{at}: needs a function name ({{'function': {{'name': ..., 'arguments': {{...}}}}}})")
    arguments = fn.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict | str):
        raise InvalidInput(f"{at}: 'arguments' must be an object or a JSON string, got {type(arguments).__name__}")
    out = {k: v for k, v in call.items() if v is not None and k not in ("function", "name", "arguments")}
    return {**out, "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def check_messages(value: Any, where: str, key: str = "messages", prompt: bool = True) -> list[Message]:
    """`value` as a checked list of messages; every problem is an InvalidInput naming `where` and the item.

    A message is {role, content} with role system, user, assistant or tool and string content; a
    tool message may carry `name` / `tool_call_id`, an assistant message `tool_calls` (content may
    then be missing or null: it becomes ""). Keys whose value is null are dropped (columnar formats
    fill a key missing from some messages with null, and templates test whether a key is defined).
    A prompt (`prompt=True`) must not end with an assistant message: it asks for that message.
    """
    value = _json_value(value, where, key)
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise InvalidInput(f"{where}: field '{key}' must be a non-empty list of {{role, content}} objects, got {got}")
    out = []
    for i, item in enumerate(value):
        at = f"{where}: {key}[{i}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{at} must be an object with 'role' and 'content', got {type(item).__name__}")
        m = {k: v for k, v in item.items() if v is not None}
        role = m.get("role")
        if role is None:
            raise InvalidInput(f"{at} has no 'role'")
        if role not in ROLES:
            raise InvalidInput(f"{at}: unknown role {role!r} (roles are {', '.join(ROLES)})")
        if "tool_calls" in m:
            if role != "assistant":
                raise InvalidInput(f"{at}: only assistant messages carry 'tool_calls'")
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise InvalidInput(f"{at}: 'tool_calls' must be a list, got {type(calls).__name__}")
            m["tool_calls"] = [_tool_call(c, f"{at}.tool_calls[{j}]") for j, c in enumerate(calls)]
            m.setdefault("content", "")
        if "content" not in m:
            raise InvalidInput(f"{at} has no 'content'")
        if not isinstance(m["content"], str):
            raise InvalidInput(f"{at}: 'content' must be a string, got {type(m['content']).__name__}")
        for name in ("name", "tool_call_id"):
            if name in m and not isinstance(m[name], str):
                raise InvalidInput(f"{at}: '{name}' must be a string, got {type(m[name]).__name__}")
        out.append(m)
    if prompt and out[-1]["role"] == "assistant":
        raise InvalidInput(
            f"{where}: the last message of '{key}' is an assistant message; a prompt ends before the assistant "
            "turn it asks for (drop it, or train on it with algorithm.name: sft)"
        )
    return out


def check_tools(value: Any, where: str, key: str = "tools") -> list[dict[str, Any]]:
    """`value` as a checked list of tool schemas (the OpenAI / Hugging Face function format, or bare)."""
    value = _json_value(value, where, key)
    if not isinstance(value, list):
        raise InvalidInput(f"{where}: field '{key}' must be a list of tool schemas (JSON objects), got {type(value).__name__}")
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise InvalidInput(f"{where}: {key}[{i}] must be a JSON object (a tool schema), got {type(tool).__name__}")
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidInput(f"{where}: {key}[{i}] has no function name ({{'type': 'function', 'function': "
                               "{'name': ..., 'parameters': {...}}}})")
    return value


def prompt_text(messages: list[Message]) -> str:
    """The `prompts` string a reward function gets for a conversation: its last user message (the
    request being answered; a row written as {"prompt": p} and as {"messages": [user p]} score the
    same), or the last message's content when there is no user message."""
    users = [m for m in messages if m["role"] == "user"]
    return (users[-1] if users else messages[-1])["content"]


def has_tool_turns(messages: list[Message]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _first_difference(a: str, b: str) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: {a[max(0, i - 20) : i + 30]!r} became {b[max(0, i - 20) : i + 30]!r}"


# ----------------------------------------------------------------------------------- rendering
class ChatFormat:
    """How one tokenizer renders conversations, probed once (a dozen short renders).

    Attributes: `plain` (no chat template used), `takes_tools` (the template renders `tools`),
    `eot_id` (the end-of-turn token a rollout stops on), `unstable_reason` (None when the template
    is prefix-stable). Cheap to keep; `chat_format` caches one per tokenizer.
    """

    def __init__(self, tokenizer: Any, use_template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.plain = not (use_template and has_template(tokenizer))
        self.takes_tools = False if self.plain else self._renders_tools()
        self._find_end_of_turn()
        self.unstable_reason = self.check_prefix_stable(None)
        if self.unstable_reason is None and self.takes_tools:
            self.unstable_reason = self.check_prefix_stable([PROBE_TOOL])

    @property
    def stable(self) -> bool:
        return self.unstable_reason is None

    def encode(self, text: str) -> list[int]:
        """Ids of rendered text: no BOS/EOS added (a template writes its own special tokens)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    # ---------------------------------------------------------------------------- render
    def render(self, messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
        """The conversation as text, by the chat template (passing `tools` where it renders them) or plainly."""
        if self.plain:
            if tools or has_tool_turns(messages):
                raise InvalidInput(
                    f"the tokenizer {self.name} has no chat template (or data.apply_chat_template is false), and the "
                    "plain rendering has no format for tools or tool turns: use a model whose chat template renders tools"
                )
            eos = self.tokenizer.eos_token or ""
            text = "".join(f"{m['role']}: {m['content']}{eos if m['role'] == 'assistant' else ''}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        if tools and not self.takes_tools:
            raise InvalidInput(f"the chat template of {self.name} does not render tools (a tool schema given to it does "
                               "not appear in its output), so the model would never see them")
        kwargs = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - jinja TemplateError, raise_exception(), TypeError: all mean "cannot render"
            raise InvalidInput(f"the chat template of {self.name} cannot render this conversation "
                               f"({type(exc).__name__}: {exc})") from None

    def _renders_tools(self) -> bool:
        try:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": "."}], tools=[PROBE_TOOL],
                                                      add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that fails on tools does not render them
            return False
        return PROBE_TOOL["function"]["name"] in text

    def _find_end_of_turn(self) -> None:
        """Split the template's closing of an assistant message into its end-of-turn token and the rest."""
        text = self.render(_CONTEXT + [{"role": "assistant", "content": _SENTINEL}])
        if _SENTINEL not in text:
            raise InvalidInput(f"the chat template of {self.name} does not render assistant content verbatim")
        closing = text[text.rindex(_SENTINEL) + len(_SENTINEL) :]
        ids = self.encode(closing)
        added = getattr(self.tokenizer, "added_tokens_decoder", {})
        if ids and ids[0] in added and closing.startswith(str(added[ids[0]])):
            self.eot_id, self.eot_text = ids[0], str(added[ids[0]])
            self.after_eot = closing[len(self.eot_text) :]
            self.eot_rendered = True
        else:
            if self.tokenizer.eos_token_id is None:
                raise InvalidInput(f"the chat template of {self.name} ends assistant turns with no special token "
                                   f"({closing!r}) and the tokenizer has no EOS token to end a turn with")
            self.eot_id, self.eot_text = int(self.tokenizer.eos_token_id), self.tokenizer.eos_token
            self.after_eot, self.eot_rendered = closing, False
        self.closing = closing  # what the template writes after an assistant body

    # ------------------------------------------------------------------------- stability
    def check_prefix_stable(self, tools: list[dict] | None = None) -> str | None:
        """Why this template is not prefix-stable with `tools` (None if it is), on probe conversations:
        at every assistant turn, the render up to it with the generation prompt must be a prefix of
        the render including it, that one a prefix of the whole conversation's, and the body between
        them the message's content."""
        probes = [[{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                   {"role": "user", "content": "second question"},
                   {"role": "assistant", "content": "<think>probe reasoning</think>second answer"},
                   {"role": "user", "content": "third question"}, {"role": "assistant", "content": "third answer"}]]
        if tools or self.takes_tools:
            call = {"type": "function", "function": {"name": "rayrlhf_probe_tool", "arguments": {"q": "x"}}}
            probes.append([{"role": "user", "content": "use the tool"},
                           {"role": "assistant", "content": '<tool_call>{"name": "rayrlhf_probe_tool"}</tool_call>'},
                           {"role": "tool", "name": "rayrlhf_probe_tool", "content": "result one"},
                           {"role": "tool", "name": "rayrlhf_probe_tool", "content": "result two"},
                           {"role": "assistant", "content": "", "tool_calls": [call]},
                           {"role": "tool", "name": "rayrlhf_probe_tool", "content": "result three"},
                           {"role": "assistant", "content": "done"}, {"role": "user", "content": "thanks"},
                           {"role": "assistant", "content": "welcome"}])
        for probe in probes:
            failure = None
            for conversation in ([{"role": "system", "content": "probe system"}, *probe], probe):
                try:
                    reason = self._stable_on(conversation, tools)
                except InvalidInput as exc:  # e.g. a template that refuses system messages: try without
                    failure = str(exc)
                    continue
                if reason is not None:
                    return reason
                failure = None
                break
            if failure is not None:
                return failure
        return None

    def _stable_on(self, messages: list[Message], tools: list[dict] | None) -> str | None:
        full = self.render(messages, tools)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], tools, add_generation_prompt=True)
            upto = self.render(messages[: k + 1], tools)
            if not upto.startswith(before):
                return (f"the generation prompt before assistant message {k} is not how the template starts that message "
                        f"({_first_difference(before, upto)})")
            if not full.startswith(upto):
                return f"appending turns after message {k} changes the earlier text ({_first_difference(upto, full)})"
            if not upto.endswith(self.closing):
                return f"assistant message {k} does not end with the closing {self.closing!r} ({upto[-40:]!r})"
            body = upto[len(before) : len(upto) - len(self.closing)]
            if not m.get("tool_calls") and body != m["content"]:
                return f"the template does not render assistant message {k} verbatim ({m['content']!r} became {body!r})"
        return None

    # ---------------------------------------------------------------------------- pieces
    def prompt_ids(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """Ids of `messages` rendered with the generation prompt of the next assistant turn."""
        return self.encode(self.render(messages, tools, add_generation_prompt=True))

    def turn_suffix_ids(
        self, history: list[Message], sampled: list[int], observation: list[Message] = (),
        tools: list[dict] | None = None, next_turn: bool = True,
    ) -> list[int]:
        """Ids to append (mask 0) after an assistant turn whose sampled ids are `sampled`.

        `history`: every message before that turn. `sampled` ends with `eot_id` when the policy ended
        the turn; otherwise (cut at the token budget) the end-of-turn token is part of the suffix.
        Then the rest of the template's closing, the `observation` turns, and (`next_turn`) the
        generation prompt of the next assistant turn, tokenized as one text.
        """
        head = [] if sampled and sampled[-1] == self.eot_id else [self.eot_id]
        return head + self.encode(self.after_eot + self._observation_text(history, list(observation), tools, next_turn))

    def _observation_text(self, history: list[Message], observation: list[Message], tools: list[dict] | None,
                          next_turn: bool) -> str:
        """What the template writes after an assistant turn's closing: observation turns, next generation prompt."""
        if not observation and not next_turn:
            return ""
        context = history if self.stable else _CONTEXT
        turn = [{"role": "assistant", "content": _SENTINEL}]
        text = self.render(context + turn + observation, tools, add_generation_prompt=next_turn)
        tail = text[text.rindex(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in text else ""
        if not tail.startswith(self.closing):
            raise InvalidInput(f"the chat template of {self.name} closes an assistant message followed by other turns "
                               f"differently ({tail[:40]!r}) than one at the end ({self.closing!r})")
        return tail[len(self.closing) :]

    def assistant_body(self, history: list[Message], message: Message, tools: list[dict] | None = None) -> str:
        """The text the policy writes for assistant `message` (its content, or the template's rendering of
        its tool calls) between the generation prompt and the closing."""
        contexts = [history, _CONTEXT] if self.stable else [_CONTEXT]
        for context in contexts:
            before = self.render(context, tools, add_generation_prompt=True)
            upto = self.render(context + [message], tools)
            end = len(upto) - len(self.closing)
            if upto.startswith(before) and upto.endswith(self.closing) and end >= len(before):
                return upto[len(before) : end]
        raise InvalidInput(f"the chat template of {self.name} does not render an assistant message as "
                           f"<generation prompt><body>{self.closing!r}: cannot tell which tokens the policy writes")

    def conversation_ids(self, messages: list[Message], tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """Ids of a whole conversation and its loss mask (1 on assistant bodies and their end-of-turn token),
        assembled as a rollout would sample it: SFT trains on exactly what the policy samples in RL.
        Messages after the last assistant message are left out (nothing after it is trained)."""
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns or turns[0] == 0:
            raise InvalidInput("a conversation to train on needs an assistant message after at least one other message")
        episode = EpisodeTokens.start(self, messages[: turns[0]], tools)
        for n, k in enumerate(turns):
            sampled = self.encode(self.assistant_body(messages[:k], messages[k], tools)) + [self.eot_id]
            following = turns[n + 1] if n + 1 < len(turns) else None
            observation = messages[k + 1 : following] if following is not None else []
            episode.add_turn(sampled, observation, next_turn=following is not None, message=messages[k])
        return episode.ids, episode.mask


@dataclass
class EpisodeTokens:
    """One episode's token list and its parallel mask (1 = sampled by the policy), with the messages
    so far (what later renders need). `start` with the prompt, then `add_turn` per assistant turn."""

    fmt: ChatFormat
    tools: list[dict] | None
    messages: list[Message]
    ids: list[int]
    mask: list[int]

    @classmethod
    def start(cls, fmt: ChatFormat, messages: list[Message], tools: list[dict] | None = None) -> EpisodeTokens:
        ids = fmt.prompt_ids(messages, tools)
        return cls(fmt, tools, list(messages), ids, [0] * len(ids))

    def add_turn(self, sampled: list[int], observation: list[Message] = (), next_turn: bool = True,
                 message: Message | None = None) -> list[int]:
        """Append a sampled turn (mask 1) and its suffix (mask 0); returns the suffix. `message` is the
        turn as a message for later renders (default: the decoded sampled ids without the end-of-turn token)."""
        suffix = self.fmt.turn_suffix_ids(self.messages, sampled, observation, self.tools, next_turn)
        if message is None:
            body = sampled[:-1] if sampled and sampled[-1] == self.fmt.eot_id else sampled
            message = {"role": "assistant", "content": self.fmt.tokenizer.decode(body, skip_special_tokens=False)}
        self.ids += [*sampled, *suffix]
        self.mask += [1] * len(sampled) + [0] * len(suffix)
        self.messages += [message, *observation]
        return suffix


# ------------------------------------------------------------------------- per-tokenizer cache
_FORMATS: weakref.WeakKeyDictionary[Any, dict[bool, ChatFormat]] = weakref.WeakKeyDictionary()


def chat_format(tokenizer: Any, use_template: bool = True) -> ChatFormat:
    """The tokenizer's ChatFormat, probed on first use and kept while the tokenizer lives."""
    per = _FORMATS.setdefault(tokenizer, {})
    if use_template not in per:
        per[use_template] = ChatFormat(tokenizer, use_template)
    return per[use_template]


def prompt_ids(tokenizer: Any, messages: list[Message], tools: list[dict] | None = None,
               use_template: bool = True) -> list[int]:
    """Ids of `messages` with the generation prompt (see ChatFormat.prompt_ids)."""
    return chat_format(tokenizer, use_template).prompt_ids(messages, tools)


def turn_suffix_ids(tokenizer: Any, history: list[Message], sampled: list[int], observation: list[Message] = (),
                    tools: list[dict] | None = None, next_turn: bool = True, use_template: bool = True) -> list[int]:
    """Ids to append after a sampled assistant turn (see ChatFormat.turn_suffix_ids)."""
    return chat_format(tokenizer, use_template).turn_suffix_ids(history, sampled, observation, tools, next_turn)


def check_prefix_stable(tokenizer: Any, tools: list[dict] | None = None, use_template: bool = True) -> str | None:
    """Why the tokenizer's template is not prefix-stable with `tools` (None if it is); see ChatFormat."""
    return chat_format(tokenizer, use_template).check_prefix_stable(tools)
