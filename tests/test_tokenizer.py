"""The word-level CLIP tokenizer of the tiny model."""

from __future__ import annotations

import json

import pytest
from transformers import CLIPTokenizer

from ddr_core.tiny_model import TINY_PROMPTS, tiny_vocabulary
from ddr_core.tokenizer import BOS_TOKEN, EOS_TOKEN, build_word_tokenizer, learn_merges


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_word_tokenizer(tiny_vocabulary(), folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def test_files_and_special_tokens(tokenizer_dir, tokenizer):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tokenizer_dir / name).is_file(), name
    assert (tokenizer_dir / "merges.txt").read_text().startswith("#version: 0.2\n")
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert len(tokenizer) == len(vocab)
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.unk_token == EOS_TOKEN
    assert tokenizer.bos_token_id == len(vocab) - 2 and tokenizer.eos_token_id == len(vocab) - 1


def test_round_trip_every_word_is_one_token(tokenizer):
    for word in tiny_vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"]
    for prompt in TINY_PROMPTS:
        encoded = tokenizer(prompt).input_ids
        assert encoded[0] == tokenizer.bos_token_id and encoded[-1] == tokenizer.eos_token_id
        assert len(encoded) == len(prompt.split()) + 2
        assert tokenizer.decode(encoded, skip_special_tokens=True) == prompt


def test_uppercase_is_lowercased(tokenizer):
    assert tokenizer("A RED Circle").input_ids == tokenizer("a red circle").input_ids


def test_no_unknown_token_in_builtin_prompts(tokenizer):
    # unk shares its id with eos (as in CLIP), so eos may appear only once, at the end.
    for prompt in TINY_PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert tokenizer.unk_token_id not in ids[:-1]


def test_distinct_prompts_give_distinct_ids(tokenizer):
    encoded = {tuple(tokenizer(prompt).input_ids) for prompt in TINY_PROMPTS}
    assert len(encoded) == len(set(TINY_PROMPTS)) == len(TINY_PROMPTS)


def test_padding_to_max_length_like_sd(tokenizer):
    batch = tokenizer(list(TINY_PROMPTS[:2]), padding="max_length", max_length=77, truncation=True)
    assert all(len(ids) == 77 for ids in batch.input_ids)
    assert batch.input_ids[0][9:] == [tokenizer.pad_token_id] * (77 - 9)


def test_out_of_vocabulary_word_falls_back_to_pieces_never_unk(tokenizer):
    # "purple" is not in the vocabulary: it splits into byte-level/sub-word pieces, the last with </w>.
    tokens = tokenizer.tokenize("purple")
    assert len(tokens) > 1
    assert "".join(tokens) == "purple</w>"
    ids = tokenizer("purple circle 42 !").input_ids
    assert tokenizer.unk_token_id not in ids[:-1]
    pieces = tokenizer.convert_ids_to_tokens(ids[1:-1])
    assert "circle</w>" in pieces and "4</w>" in pieces and "2</w>" in pieces and "!</w>" in pieces
    # still deterministic and decodable
    assert tokenizer("purple").input_ids == tokenizer("purple").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "purple circle 4 2 !"


def test_loads_without_tokenizer_json(tokenizer_dir, tmp_path):
    # Only CLIP's classic vocab.json + merges.txt (+ configs): still loads and encodes the same.
    for path in tokenizer_dir.iterdir():
        if path.name != "tokenizer.json":
            (tmp_path / path.name).write_bytes(path.read_bytes())
    reference = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    classic = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for prompt in TINY_PROMPTS[:5]:
        assert classic(prompt).input_ids == reference(prompt).input_ids


def test_build_is_deterministic(tokenizer_dir, tmp_path):
    build_word_tokenizer(reversed(list(reversed(tiny_vocabulary()))), tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes()


def test_overlapping_words_each_merge_to_one_token(tmp_path):
    words = ["black", "lack", "bla", "la", "a", "aa", "aaa", "banana", "ban", "nana"]
    tokenizer = build_word_tokenizer(words, tmp_path)
    for word in words:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    assert len(learn_merges(words)) >= len(set(words)) - 1


@pytest.mark.parametrize("bad", [["two words"], ["x1"], ["don't"], []])
def test_rejects_non_letter_words(bad, tmp_path):
    with pytest.raises(ValueError):
        build_word_tokenizer(bad, tmp_path)
