"""Character tokenizers with real chat templates, built locally, for conversation and agent tests.

The tiny tokenizer's template ("U: ...\\n") has no end-of-turn token and no tools. These add the
special tokens and templates of the two common families, written for this project:

- "chatml": <|im_start|>role ... <|im_end|>; a system block listing `tools`; assistant tool calls
  as <tool_call>{"name", "arguments"}</tool_call>; consecutive tool results grouped in one user
  block as <tool_result>...</tool_result> (so a message's rendering depends on its neighbours);
- "headers": <|begin_of_text|> then <|start_header_id|>role<|end_header_id|> blocks closed by
  <|eot_id|>; `tools` described in the first user message; tool results under the `ipython` role;
- "chatml-think": ChatML that drops the <think>...</think> part of assistant messages that are not
  the last one, a template that is NOT prefix-stable (as some reasoning models' are).

Every template keeps the tokenizer's EOS (</s>) distinct from the end-of-turn token. Each
character stays one token, so a text's tokenization does not depend on where it is cut.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from rayrlhf.models.tiny import build_tokenizer

CHATML_TEMPLATE = (
    "{%- set has_system = messages and messages[0].role == 'system' -%}"
    "{%- set rest = messages[1:] if has_system else messages -%}"
    "{%- if has_system or tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if has_system %}{{ messages[0].content }}{% endif -%}"
    "{%- if tools -%}"
    "{%- if has_system %}{{ '\\n\\n' }}{% endif -%}"
    "{{- 'Tools you may call, one <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call> per call:' -}}"
    "{%- for t in tools %}{{ '\\n' }}{{ t | tojson }}{% endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in rest -%}"
    "{%- if m.role == 'tool' -%}"
    "{%- if loop.first or rest[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user\\n' }}{% else %}{{ '\\n' }}{% endif -%}"
    "{{- '<tool_result>' + m.content + '</tool_result>' -}}"
    "{%- if loop.last or rest[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif -%}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + m.content -}}"
    "{%- for c in m.tool_calls or [] -%}"
    "{%- set args = c.function.arguments if c.function.arguments is string else c.function.arguments | tojson -%}"
    "{{- '<tool_call>{\"name\": ' + c.function.name | tojson + ', \"arguments\": ' + args + '}</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)

HEADERS_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- set ns = namespace(tools_shown=false) -%}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + ('ipython' if m.role == 'tool' else m.role) + '<|end_header_id|>\\n\\n' -}}"
    "{%- if m.role == 'user' and tools and not ns.tools_shown -%}"
    "{{- 'Call a function by answering {\"name\": ..., \"parameters\": {...}}. Functions:\\n' -}}"
    "{%- for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor -%}"
    "{{- '\\n' -}}"
    "{%- set ns.tools_shown = true -%}"
    "{%- endif -%}"
    "{%- if m.role == 'assistant' and m.tool_calls -%}"
    "{%- for c in m.tool_calls -%}"
    "{{- '{\"name\": ' + c.function.name | tojson + ', \"parameters\": ' + c.function.arguments | tojson + '}' -}}"
    "{%- endfor -%}"
    "{%- else -%}{{- m.content -}}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif -%}"
)

CHATML_THINK_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- set content = m.content -%}"
    "{%- if m.role == 'assistant' and not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)

STYLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>")),
    "headers": (HEADERS_TEMPLATE, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "chatml-think": (CHATML_THINK_TEMPLATE, ("<|im_start|>", "<|im_end|>")),
}


def build_chat_tokenizer(style: str = "chatml") -> PreTrainedTokenizerFast:
    """The character tokenizer with the special tokens and chat template of `style` (see STYLES)."""
    if style not in STYLES:
        raise ValueError(f"unknown chat style {style!r}; styles are {sorted(STYLES)}")
    template, specials = STYLES[style]
    tok = build_tokenizer()
    tok.add_tokens(list(specials), special_tokens=True)
    tok.chat_template = template
    return tok
