"""A tiny word-level CLIP BPE tokenizer built from a fixed word list.

The embedded tiny model (``ddr_core.tiny_model``) needs a real ``transformers.CLIPTokenizer`` so
that ``StableDiffusionPipeline.from_pretrained`` loads it exactly like Stable Diffusion's, but
without downloading CLIP's 49k-token vocabulary. :func:`build_word_tokenizer` writes a
vocabulary laid out like CLIP's:

* ids ``0..255``: the 256 byte-level symbols (GPT-2 ``bytes_to_unicode`` order);
* ids ``256..511``: the same symbols with the CLIP end-of-word suffix ``</w>``;
* then one token per BPE merge, learned deterministically from the word list until every
  word is a single token;
* last the two specials ``<|startoftext|>`` (bos) and ``<|endoftext|>`` (eos, pad and unk).

Consequences:

* every word of the list tokenizes to exactly one token, lowercase or not (CLIP lowercases);
* distinct word sequences give distinct id sequences;
* an out-of-vocabulary word never becomes the unknown token: it falls back to the longest
  learned sub-word pieces and, at worst, to one byte-level symbol per character (the last one
  carrying ``</w>``). Digits are split one per token and punctuation runs form their own
  pre-tokens, exactly as in CLIP.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
_WORD_PATTERN = re.compile(r"^[a-z]+$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table (256 entries, fixed order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def normalize_words(words: Iterable[str]) -> list[str]:
    """Lowercased, de-duplicated words in first-seen order.

    Raises:
        ValueError: for an empty list or a word that is not made of letters ``a-z`` only (CLIP's
            pre-tokenizer splits digits and punctuation away from letters, so such a word could
            never be a single token).
    """
    seen: dict[str, None] = {}
    for raw in words:
        word = raw.strip().lower()
        if not _WORD_PATTERN.match(word):
            raise ValueError(
                f"Tokenizer word {raw!r} must be a single word of letters a-z only; split prompts "
                "into words on whitespace and drop punctuation and digits."
            )
        seen.setdefault(word, None)
    if not seen:
        raise ValueError("build_word_tokenizer needs at least one word.")
    return list(seen)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Deterministic BPE merges that turn each word into one token.

    Each word is split into characters, the last one carrying ``</w>``. Repeatedly the most
    frequent adjacent pair over the word set is merged (ties: lexicographically smallest pair)
    until every word is a single symbol. Applying these merges in rank order (what CLIP's BPE
    does) reproduces the training segmentation, so every word encodes to one token.

    Returns:
        Merges in rank order, each a ``(left, right)`` symbol pair.
    """
    segmentations = [[*word[:-1], word[-1] + END_OF_WORD] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols in segmentations:
            pair_counts.update(zip(symbols, symbols[1:], strict=False))
        if not pair_counts:
            return merges
        best_pair = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best_pair)
        segmentations = [_apply_merge(symbols, best_pair) for symbols in segmentations]


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


def build_word_tokenizer(words: Iterable[str], out_dir: str | Path) -> CLIPTokenizer:
    """Write a CLIP BPE tokenizer whose vocabulary makes each given word a single token.

    Files written to ``out_dir``: ``vocab.json``, ``merges.txt`` (CLIP format, ``#version: 0.2``
    header), ``special_tokens_map.json`` and ``tokenizer_config.json`` (``model_max_length`` 77,
    bos ``<|startoftext|>``, eos/pad/unk ``<|endoftext|>``), plus whatever
    ``CLIPTokenizer.save_pretrained`` adds (``tokenizer.json``). The output is byte-identical
    for the same word list.

    Args:
        words: Vocabulary words; lowercased and de-duplicated, letters ``a-z`` only.
        out_dir: Folder to create or overwrite (for a diffusers model: ``<model>/tokenizer``).

    Returns:
        The tokenizer re-loaded with ``CLIPTokenizer.from_pretrained(out_dir)``.

    Raises:
        ValueError: for an empty word list or a word with non-letters.
        RuntimeError: if a word does not encode to exactly one token (a bug, never expected).
    """
    word_list = normalize_words(words)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)

    byte_symbols = list(bytes_to_unicode().values())
    vocab_tokens = byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]
    merges = learn_merges(word_list)
    known = set(vocab_tokens)
    for left, right in merges:
        merged = left + right
        if merged not in known:
            known.add(merged)
            vocab_tokens.append(merged)
    vocab_tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_tokens)}

    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.save_pretrained(out_path)
    special_tokens = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    (out_path / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n")
    # CLIP's own slow-tokenizer files, written explicitly so any loader (and a human) can read them.
    (out_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=None) + "\n")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (out_path / "merges.txt").write_text(merges_text, encoding="utf-8")

    loaded = CLIPTokenizer.from_pretrained(out_path, local_files_only=True)
    for word in word_list:
        ids = loaded(word, add_special_tokens=False).input_ids
        if ids != [vocab[word + END_OF_WORD]]:
            raise RuntimeError(
                f"Word {word!r} encodes to {ids}, expected one token; tokenizer build is broken."
            )
    return loaded


def prompt_words(prompts: Iterable[str]) -> list[str]:
    """Lowercased words of the prompts in first-seen order (whitespace split)."""
    return normalize_words(word for prompt in prompts for word in prompt.split())
