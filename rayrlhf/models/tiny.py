"""A tiny causal LM and character-level tokenizer, built locally.

No model hub is reachable in tests, CI or the demo, so they build their models here: a real
`transformers` Llama (vLLM and DeepSpeed treat it like any hub model) with a character-level
`tokenizers` tokenizer, both saved with `save_pretrained` into an ordinary HF directory.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
TINY_PREFIX = "tiny:"
CHARSET = string.ascii_letters + string.digits + string.punctuation + " \n"

# A chat template so that chat-template-aware code paths run on the tiny model too (tools: one line naming them).
CHAT_TEMPLATE = (
    "{% if tools %}S: tools {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def build_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """One token per character, plus pad/bos/eos/unk; decoding concatenates characters."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(charset):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # "." misses "\n": "\n\n" was <unk>
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_model(
    output_dir: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    arch: str = "llama",
) -> Path:
    """Write a randomly initialised tiny model (row `arch` of the matrix, default an untied Llama)
    and its tokenizer to `output_dir` and return the path.

    The head dimension is hidden_size / num_heads; keep it at 32 or more, the smallest that
    vLLM's CPU attention kernels support.
    """
    from rayrlhf.models.architectures import build_architecture

    shape = {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
             "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings}
    if arch == "llama":
        shape["num_key_value_heads"] = num_heads
    return build_architecture(arch, output_dir, seed=seed, **shape)


def resolve_model_path(name: str, cache_dir: str | Path, seed: int = 0) -> str:
    """'tiny' (a Llama) or 'tiny:<arch>' (a row of the architecture matrix) builds the model once under
    `cache_dir`; anything else is a directory or hub id."""
    if name != "tiny" and not name.startswith(TINY_PREFIX):
        return name
    arch = name.removeprefix(TINY_PREFIX) if name != "tiny" else "llama"
    target = Path(cache_dir) / ("tiny-model" if arch == "llama" else f"tiny-{arch}")
    if not (target / "config.json").is_file():
        build_tiny_model(target, seed=seed, arch=arch)
    return str(target)
