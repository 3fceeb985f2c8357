"""Tokenizer wrapper around Hugging Face `tokenizers`, buildable from a HF folder or GGUF metadata.

The GGUF path reproduces llama.cpp's tokenizer (vocabulary, merges, special tokens and the
pre-tokenizer regexes selected by `tokenizer.ggml.pre`) so that prompts tokenize exactly as
llama.cpp's `/tokenize` endpoint with `parse_special` would.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)

TokenizerKind = Literal["byte_level", "spm", "generic"]


class TokenizerError(ValueError):
    """Raised for unsupported or malformed tokenizer definitions."""


# llama.cpp token types (gguf `tokenizer.ggml.token_type`).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# --- Pre-tokenizer regexes (applied in sequence, each match isolated), following llama.cpp. ---
# GPT-2's original regex; the trailing `|\s+` only names pieces llama.cpp keeps as leftovers anyway.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# cl100k / Llama-3 style: case-insensitive contractions, numbers in groups of up to three.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 / StableLM2: like Llama-3 but single digits.
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (GPT-4o) style: splits CamelCase words, keeps contractions attached.
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> regex sequence. Mapping (same grouping as llama.cpp):
#   default (and unknown)            -> llama.cpp's fallback: punctuation runs, GPT-2, digit runs, 3-digit chunks
#   gpt2/gpt-2/phi-2/mpt/olmo/...    -> GPT-2 regex
#   smollm/starcoder/refact/...      -> every digit isolated, then GPT-2 regex (SmolLM2)
#   llama3/llama-bpe/dbrx/smaug-bpe  -> Llama-3 / cl100k regex (Phi-4 GGUFs use "dbrx")
#   qwen2/stablelm2/deepseek-r1-qwen -> Qwen2 regex
#   gpt-4o/llama4                    -> o200k regex
_DEFAULT_SEQ = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT_SEQ,
    **dict.fromkeys(
        ("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "exaone4"), (_GPT2,)
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2)
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), (_LLAMA3,)
    ),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), (_QWEN2,)),
    **dict.fromkeys(("gpt-4o", "llama4"), (_GPT4O,)),
}
# llama.cpp enables these flags only for the Llama-3 family of pre-tokenizers.
_IGNORE_MERGES_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})
_ADD_BOS_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char table used by byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _byte_level_bytes(token: str) -> bytes:
    try:
        return bytes([_CHAR_TO_BYTE[c] for c in token])
    except KeyError:
        # Not byte-level encoded (e.g. a user-defined token stored verbatim): use its raw text.
        return token.encode("utf-8")


def _spm_bytes(token: str) -> bytes:
    # SentencePiece byte-fallback pieces look like <0x0A>.
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("▁", " ").encode("utf-8")


def _token_content(tok: Any) -> str | None:
    """bos/eos entries in tokenizer_config.json are either strings or {"content": ...} dicts."""
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping):
        content = tok.get("content")
        return content if isinstance(content, str) else None
    return None


def _pick_chat_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        tpl = named.get("default")
        if tpl is None and named:
            tpl = next(iter(named.values()))
        return tpl if isinstance(tpl, str) else None
    return None


class Tokenizer:
    """Text <-> token ids, raw token bytes, and special-token bookkeeping for one model."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        kind: TokenizerKind = "generic",
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        special_token_ids: Iterable[int] = (),
        id_to_token: list[str] | None = None,
    ) -> None:
        self._backend = backend
        self._kind: TokenizerKind = kind
        self._chat_template = chat_template
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self._eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None

        added = backend.get_added_tokens_decoder()
        self._added_ids = set(added)
        specials = {i for i, t in added.items() if t.special}
        specials.update(special_token_ids)
        for tid in (self._bos_token_id, self._eos_token_id):
            if tid is not None:
                specials.add(tid)
        self._special_ids: frozenset[int] = frozenset(specials)

        size = backend.get_vocab_size(with_added_tokens=True)
        if id_to_token is None:
            id_to_token = [backend.id_to_token(i) or "" for i in range(size)]
        self._id_to_token = id_to_token
        # Precomputed so streaming detokenization is a table lookup per token.
        self._token_bytes: list[bytes | None] = [None] * len(id_to_token)
        if kind != "generic":
            convert = _byte_level_bytes if kind == "byte_level" else _spm_bytes
            for i, tok in enumerate(id_to_token):
                self._token_bytes[i] = tok.encode("utf-8") if i in self._added_ids else convert(tok)

        probe = backend.encode("", add_special_tokens=True).ids
        self._add_bos = self._bos_token_id is not None and probe[:1] == [self._bos_token_id]

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json (or GPT-2 style vocab.json + merges.txt) plus tokenizer_config.json."""
        folder = Path(path)
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        special_map: dict[str, Any] = {}
        if (folder / "special_tokens_map.json").is_file():
            special_map = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))

        kind: TokenizerKind
        if (folder / "tokenizer.json").is_file():
            raw = (folder / "tokenizer.json").read_text(encoding="utf-8")
            backend = HFTokenizer.from_str(raw)
            kind = _kind_from_decoder(json.loads(raw).get("decoder"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            backend = _gpt2_from_files(folder / "vocab.json", folder / "merges.txt")
            kind = "byte_level"
        else:
            raise TokenizerError(f"{folder}: no tokenizer.json or vocab.json + merges.txt found")

        # added_tokens_decoder may declare tokens missing from tokenizer.json (always so for vocab.json).
        # A declared token that is only an ordinary vocab entry (GPT-2 style vocab.json lists
        # <|endoftext|>) must still become an added token, else "<|im_start|>" in a prompt is BPE'd.
        decl = config.get("added_tokens_decoder") or {}
        added_contents = {t.content for t in backend.get_added_tokens_decoder().values()}
        special_ids: set[int] = set()
        to_add: list[tuple[int, AddedToken]] = []
        for sid, spec in sorted(decl.items(), key=lambda kv: int(kv[0])):
            tid, content = int(sid), spec.get("content")
            if not isinstance(content, str):
                continue
            if spec.get("special", False):
                special_ids.add(tid)
            if content not in added_contents:
                to_add.append((tid, _added_token(spec)))
        _add_tokens(backend, to_add)

        bos = _token_content(config.get("bos_token")) or _token_content(special_map.get("bos_token"))
        eos = _token_content(config.get("eos_token")) or _token_content(special_map.get("eos_token"))
        for tok in (bos, eos):
            if tok is not None and tok not in added_contents and tok not in {t.content for _, t in to_add}:
                backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)])

        if backend.post_processor is None and (config.get("add_bos_token") or config.get("add_eos_token")):
            _set_template_processing(
                backend,
                bos if config.get("add_bos_token") else None,
                eos if config.get("add_eos_token") else None,
            )

        template = _pick_chat_template(config.get("chat_template"))
        if (folder / "chat_template.jinja").is_file():
            # Newer transformers save the template separately; it takes precedence there too.
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            data = json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))
            template = _pick_chat_template(data.get("chat_template")) or template

        return cls(
            backend,
            kind=kind,
            bos_token=bos,
            eos_token=eos,
            chat_template=template,
            special_token_ids=special_ids,
        )

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike[str] | Any) -> Tokenizer:
        """Build from a GGUF file path or an already-open `gguf.GGUFReader`."""
        if isinstance(path_or_reader, str | os.PathLike):
            try:
                meta = read_gguf_metadata(path_or_reader, prefix="tokenizer.")
            except _UnsupportedLayout:
                import gguf

                meta = _metadata_from_reader(gguf.GGUFReader(path_or_reader), prefix="tokenizer.")
        else:
            meta = _metadata_from_reader(path_or_reader, prefix="tokenizer.")
        return cls.from_gguf_metadata(meta)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF key/value metadata (the `tokenizer.*` keys, optionally `general.name`)."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF has no tokenizer.ggml.tokens")
        tokens = list(tokens)
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens))
        if model == "gpt2":
            return _from_gguf_bpe(cls, meta, tokens, types)
        if model == "llama":
            return _from_gguf_spm(cls, meta, tokens, types)
        raise TokenizerError(
            f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
        )

    # ------------------------------------------------------------------ public API

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`; special-token strings inside `text` become their special ids."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if self._kind == "byte_level":
            # Same result as the byte-level decoder, but also handles verbatim added tokens.
            skip = self._special_ids if skip_special_tokens else frozenset()
            data = b"".join(self.token_bytes(i) for i in ids if i not in skip)
            return data.decode("utf-8", errors="replace")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes token `token_id` stands for (special tokens: their UTF-8 text)."""
        cached = self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else None
        if cached is not None:
            return cached
        if not 0 <= token_id < len(self._id_to_token):
            raise IndexError(f"token id {token_id} out of range")
        text = self._backend.decode([token_id], skip_special_tokens=False)
        data = text.encode("utf-8")
        self._token_bytes[token_id] = data
        return data

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._id_to_token):
            raise IndexError(f"token id {token_id} out of range")
        return self._id_to_token[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def backend(self) -> HFTokenizer:
        return self._backend

    @property
    def kind(self) -> TokenizerKind:
        return self._kind

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def add_bos_token(self) -> bool:
        """Whether encode(..., add_special_tokens=True) prepends BOS."""
        return self._add_bos

    @property
    def special_token_ids(self) -> set[int]:
        return set(self._special_ids)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self._kind!r}, vocab_size={self.vocab_size}, eos={self._eos_token!r})"


# ---------------------------------------------------------------------- HF folder helpers


def _kind_from_decoder(spec: Any) -> TokenizerKind:
    if not isinstance(spec, Mapping):
        return "generic"
    parts = spec.get("decoders") if spec.get("type") == "Sequence" else [spec]
    types = {p.get("type") for p in parts or [] if isinstance(p, Mapping)}
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or "ByteFallback" in types:
        return "spm"
    return "generic"


def _gpt2_from_files(vocab_path: Path, merges_path: Path) -> HFTokenizer:
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    merges: list[tuple[str, str]] = []
    for line in merges_path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        left, _, right = line.partition(" ")
        merges.append((left, right))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _added_token(spec: Mapping[str, Any]) -> AddedToken:
    return AddedToken(
        spec["content"],
        single_word=bool(spec.get("single_word", False)),
        lstrip=bool(spec.get("lstrip", False)),
        rstrip=bool(spec.get("rstrip", False)),
        normalized=bool(spec.get("normalized", not spec.get("special", False))),
        special=bool(spec.get("special", False)),
    )


def _add_tokens(backend: HFTokenizer, tokens: list[tuple[int, AddedToken]]) -> None:
    """Add tokens; ids follow the model vocab, so warn if the declared id differs."""
    for tid, tok in tokens:
        if tok.special:
            backend.add_special_tokens([tok])
        else:
            backend.add_tokens([tok])
        got = backend.token_to_id(tok.content)
        if got != tid:
            logger.warning("added token %r got id %s, config declares %s", tok.content, got, tid)


def _set_template_processing(backend: HFTokenizer, bos: str | None, eos: str | None) -> None:
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t is not None]
    if any(tid is None for _, tid in specials):
        return

    def template(seq: str, type_id: int) -> list[str]:
        return [
            *([f"{bos}:{type_id}"] if bos else []),
            f"{seq}:{type_id}",
            *([f"{eos}:{type_id}"] if eos else []),
        ]

    single = " ".join(template("$A", 0))
    pair = " ".join(template("$A", 0) + template("$B", 1))
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# ---------------------------------------------------------------------- GGUF builders


def _gguf_special_id(meta: Mapping[str, Any], key: str, default: int | None, n: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}_token_id", default)
    if value is None or not 0 <= int(value) < n:
        return None
    return int(value)


def _gguf_added_tokens(
    meta: Mapping[str, Any], tokens: list[str], types: list[int]
) -> tuple[list[AddedToken], set[int]]:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens.

    Both are matched verbatim inside input text, like llama.cpp's special-token partitioning.
    """
    name = str(meta.get("general.name") or "").lower()
    # llama.cpp strips whitespace right of Phi-3's control tokens (mirrors its HF tokenizer config).
    phi3 = "phi-3" in name or "phi3" in name
    added: list[AddedToken] = []
    special: set[int] = set()
    for i, (tok, typ) in enumerate(zip(tokens, types, strict=False)):
        if typ not in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_USER_DEFINED) or not tok:
            continue
        is_special = typ != TOKEN_TYPE_USER_DEFINED
        if is_special:
            special.add(i)
        rstrip = phi3 and is_special and tok not in ("<unk>", "<s>", "<|endoftext|>")
        added.append(
            AddedToken(tok, special=is_special, normalized=False, rstrip=rstrip or (phi3 and tok == "</s>"))
        )
    return added, special


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # duplicates: first id wins, as in llama.cpp's text->id map
    return vocab


def _finish_gguf(
    cls: type[Tokenizer],
    backend: HFTokenizer,
    meta: Mapping[str, Any],
    tokens: list[str],
    types: list[int],
    kind: TokenizerKind,
    *,
    bos_id: int | None,
    eos_id: int | None,
    add_bos: bool,
    add_eos: bool,
) -> Tokenizer:
    added, special = _gguf_added_tokens(meta, tokens, types)
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    bos = tokens[bos_id] if bos_id is not None else None
    eos = tokens[eos_id] if eos_id is not None else None
    if (add_bos and bos) or (add_eos and eos):
        _set_template_processing(backend, bos if add_bos else None, eos if add_eos else None)
    template = meta.get("tokenizer.chat_template")
    return cls(
        backend,
        kind=kind,
        bos_token=bos,
        eos_token=eos,
        chat_template=template if isinstance(template, str) else None,
        special_token_ids=special,
        id_to_token=tokens,
    )


def _from_gguf_bpe(
    cls: type[Tokenizer], meta: Mapping[str, Any], tokens: list[str], types: list[int]
) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre") or "default"
    regexes = _PRE_TOKENIZER_REGEXES.get(pre)
    if regexes is None:
        logger.warning("unknown tokenizer.ggml.pre %r; using llama.cpp's 'default' pre-tokenizer", pre)
        regexes = _DEFAULT_SEQ
    vocab = _vocab_dict(tokens)
    merges: list[tuple[str, str]] = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        pos = m.find(" ", 1)
        if pos < 0:
            continue
        left, right = m[:pos], m[pos + 1 :]
        # tokenizers rejects merges whose parts/result are out of vocabulary; they can never fire anyway.
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES_PRE)
    backend = HFTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    n = len(tokens)
    return _finish_gguf(
        cls,
        backend,
        meta,
        tokens,
        types,
        "byte_level",
        bos_id=_gguf_special_id(meta, "bos", None, n),
        eos_id=_gguf_special_id(meta, "eos", None, n),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", pre in _ADD_BOS_PRE)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


def _from_gguf_spm(
    cls: type[Tokenizer], meta: Mapping[str, Any], tokens: list[str], types: list[int]
) -> Tokenizer:
    """SentencePiece-BPE vocab (Llama-2, Phi-3) as a byte-fallback BPE whose merges come from scores.

    SentencePiece merges the adjacent pair whose concatenation has the highest score; ranking every
    (left, right) split of each normal token by that token's score reproduces this with BPE.
    """
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = _vocab_dict(tokens)
    candidates: list[tuple[float, int, int, str, str]] = []
    for i, (tok, typ) in enumerate(zip(tokens, types, strict=False)):
        if typ != TOKEN_TYPE_NORMAL or len(tok) < 2 or vocab.get(tok) != i:
            continue
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                candidates.append((-float(scores[i]), vocab[left], vocab[right], left, right))
    candidates.sort()
    merges = [(left, right) for _, _, _, left, right in candidates]
    n = len(tokens)
    unk_id = _gguf_special_id(meta, "unknown", 0, n)
    model = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = HFTokenizer(model)
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # Prepend runs per text segment between special tokens, matching llama.cpp's SPM session.
    norm = [normalizers.Replace(" ", "▁")]
    if add_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    return _finish_gguf(
        cls,
        backend,
        meta,
        tokens,
        types,
        "spm",
        bos_id=_gguf_special_id(meta, "bos", 1, n),
        eos_id=_gguf_special_id(meta, "eos", 2, n),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


# ---------------------------------------------------------------------- GGUF metadata reading


class _UnsupportedLayout(Exception):
    pass


_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike[str], prefix: str = "") -> dict[str, Any]:
    """Read GGUF key/values (only keys starting with `prefix`) without parsing tensor infos.

    gguf.GGUFReader builds numpy views for every array element, which takes seconds for a
    100k-token vocabulary; this struct-based reader takes milliseconds.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _parse_kv(buf, prefix)
        finally:
            buf.release()


def _parse_kv(buf: memoryview, prefix: str) -> dict[str, Any]:
    if bytes(buf[:4]) != b"GGUF":
        raise TokenizerError("not a GGUF file")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):  # v1 used 32-bit counts; big-endian files show a byte-swapped version
        raise _UnsupportedLayout
    _, n_kv = struct.unpack_from("<QQ", buf, 8)
    off = 24
    out: dict[str, Any] = {}
    unpack = struct.unpack_from

    def read_str(o: int) -> tuple[str, int]:
        (n,) = unpack("<Q", buf, o)
        return bytes(buf[o + 8 : o + 8 + n]).decode("utf-8", errors="replace"), o + 8 + n

    def skip_or_read(vtype: int, o: int, keep: bool) -> tuple[Any, int]:
        if vtype == _GGUF_STRING:
            return read_str(o)
        if vtype in _SCALAR_FMT:
            fmt = "<" + _SCALAR_FMT[vtype]
            return unpack(fmt, buf, o)[0], o + struct.calcsize(fmt)
        if vtype == _GGUF_ARRAY:
            itype, count = unpack("<IQ", buf, o)
            o += 12
            if itype in _SCALAR_FMT:
                size = struct.calcsize("<" + _SCALAR_FMT[itype])
                values = list(struct.unpack_from(f"<{count}{_SCALAR_FMT[itype]}", buf, o)) if keep else None
                return values, o + size * count
            items: list[Any] = []
            for _ in range(count):
                item, o = skip_or_read(itype, o, keep)
                if keep:
                    items.append(item)
            return (items if keep else None), o
        raise TokenizerError(f"unknown GGUF value type {vtype}")

    for _ in range(n_kv):
        key, off = read_str(off)
        (vtype,) = unpack("<I", buf, off)
        keep = key.startswith(prefix) or key == "general.name"
        value, off = skip_or_read(vtype, off + 4, keep)
        if keep:
            out[key] = value
    return out


def _metadata_from_reader(reader: Any, prefix: str = "") -> dict[str, Any]:
    """Extract key/values from a gguf.GGUFReader (works across gguf-py versions)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        # GGUF.* are the reader's pseudo-fields for the header, not metadata keys.
        if key.startswith("GGUF.") or not (key.startswith(prefix) or key == "general.name"):
            continue
        out[key] = _field_value(field)
    return out


def _field_value(field: Any) -> Any:
    types = list(field.types)
    if not types:
        return None

    def conv(idx: int, vtype: int) -> Any:
        part = field.parts[idx]
        if vtype == _GGUF_STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part.tolist()
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    if int(types[0]) == _GGUF_ARRAY:
        itype = int(types[-1])
        return [conv(i, itype) for i in field.data]
    return conv(field.data[0], int(types[0]))
