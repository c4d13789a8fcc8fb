"""Tokenizers: the checkpoint's own (Llama-2 + <PAD>) for real models, an offline Llama-shaped one for tests.

The tiny tokenizer reproduces the ids that matter to OpenVLA: <unk>=0, <s>=1 (prepended to every encoding),
</s>=2, byte-fallback tokens 3..258, "▁"=29871, <PAD>=32000, and 256 action ids 31744..31999 at the top of the
32000-token base vocabulary. It is character level (BPE without merges), so any ASCII text round-trips. Each
action id is a single character (as in Llama-2, where they are rare single characters), so decoding action ids
and re-tokenizing the string gives the same ids back, which the prompt builder relies on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BASE_VOCAB_SIZE = 32000  # Llama-2's vocabulary; <PAD> is 32000
SPACE_ID = 29871  # "▁" in Llama-2
NUM_ACTION_TOKENS = 256
ACTION_CHAR_START = 0x4E00  # action tokens are the characters U+4E00.. (CJK ideographs, absent from prompts)


def _base_vocab() -> dict[str, int]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    printable = [chr(c) for c in range(0x21, 0x7F)]
    vocab.update({ch: 259 + i for i, ch in enumerate(printable)})
    first_action = BASE_VOCAB_SIZE - NUM_ACTION_TOKENS
    for token_id in range(259 + len(printable), first_action):
        vocab["▁" if token_id == SPACE_ID else f"<filler_{token_id}>"] = token_id
    vocab.update({chr(ACTION_CHAR_START + i): first_action + i for i in range(NUM_ACTION_TOKENS)})
    return vocab


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab=_base_vocab(), merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=2048,
    )
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})  # gets id 32000, as in OpenVLA
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint folder (`tokenizer.save_pretrained(path)`), read offline."""
    path = Path(path)
    only_spm = not (path / "tokenizer.json").is_file() and (path / "tokenizer.model").is_file()
    if only_spm and importlib.util.find_spec("sentencepiece") is None:
        # transformers would otherwise fall back to reading it as a tiktoken file and fail obscurely.
        raise ImportError(f"{path} has a sentencepiece tokenizer.model but no tokenizer.json: install sentencepiece")
    # Passing a config keeps AutoTokenizer from parsing config.json, whose model_type "openvla" it does not know.
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, config=PretrainedConfig())
