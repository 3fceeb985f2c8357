"""A miniature microsoft/phi-4: Phi-4's file layout, config keys, special-token ids and chat template,
at tiny sizes, written with transformers and tokenizers (no download).

What matches Phi-4: Phi3ForCausalLM with fused qkv_proj/gate_up_proj, GQA 4:1, rope_theta 250000,
16384 context, untied embeddings, bf16 weights in 2 safetensors shards with an index, config.json
naming only <|endoftext|> (100257) as EOS, a byte-level BPE vocabulary of 100352 ids whose
specials sit where Phi-4's do (<|endoftext|>=100257, <|im_start|>=100264, <|im_end|>=100265,
<|im_sep|>=100266, ...), tokenizer.json plus vocab.json/merges.txt, and a tokenizer_config.json
as the first release shipped it (bos = eos = pad = <|endoftext|>, the user turn always appending
the assistant header) or with those bugs fixed (eos <|im_end|>, add_generation_prompt honoured).
The remaining added ids hold <|dummy_N|> placeholders (their numbering here is illustrative).

Only the sizes differ (hidden 32, 2 layers), so the 100352-row embedding stays ~6 MB in bf16.
"""

from __future__ import annotations

import functools
import itertools
import json
import string
from pathlib import Path
from typing import Literal

import torch
from gguf import GGMLQuantizationType, GGUFWriter
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import Phi3Config, Phi3ForCausalLM

from phiserve.tokenizer.chat_template import PHI4_CHAT_TEMPLATE
from tests.models.tiny_checkpoints import _add, _randomize

VOCAB = 100352
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32, 128, 2, 4, 1  # Phi-4: 5120, 17920, 40, 40, 10
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA = 250000.0
CONTEXT = 16384
EPS = 1e-5

ENDOFTEXT, IM_START, IM_END, IM_SEP = 100257, 100264, 100265, 100266
PAD = 100349  # Phi-4's config.json pad_token_id (<|dummy_85|>)
FIRST_ADDED = 100256  # cl100k's ordinary tokens end at 100255; ids from here on are added tokens
NAMED_SPECIALS = {
    100257: "<|endoftext|>",
    100258: "<|fim_prefix|>",
    100259: "<|fim_middle|>",
    100260: "<|fim_suffix|>",
    IM_START: "<|im_start|>",
    IM_END: "<|im_end|>",
    IM_SEP: "<|im_sep|>",
    100276: "<|endofprompt|>",
}

# The template of Phi-4's first release (tokenizer_config.json, Dec 2024), written out here:
# user turns always append the assistant header, assistant turns are bare content + <|im_end|>,
# add_generation_prompt is ignored and any other role (e.g. "tool") is silently dropped.
PHI4_FIRST_RELEASE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|><|im_start|>assistant<|im_sep|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}"
    "{% endfor %}"
)

Release = Literal["first", "fixed"]

# cl100k's split pattern: Phi-4's vocabulary is cl100k's (llama.cpp's "dbrx" pre-tokenizer).
CL100K_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CORPUS = [
    "Hello world, this is a miniature Phi-4. The system says hi; the user answers 42.",
    "You are a helpful assistant. What is 2+2? It is 4. Tell me a joke about the sea.",
    "Names: red, green, blue. Numbers 1234567 and 2025. Done!",
] * 5


def special_tokens() -> dict[int, str]:
    """Every added token id -> content: the named Phi-4 specials, <|dummy_N|> elsewhere."""
    dummies = (f"<|dummy_{i}|>" for i in itertools.count())
    return {i: NAMED_SPECIALS.get(i) or next(dummies) for i in range(FIRST_ADDED, VOCAB)}


def _filler_words() -> itertools.chain[str]:
    # Ordinary tokens that pad the vocabulary to 100256; "Ġab" decodes to " ab", so text stays readable.
    letters = string.ascii_lowercase
    return itertools.chain.from_iterable(
        ("Ġ" + "".join(p) for p in itertools.product(letters, repeat=n)) for n in (2, 3, 4)
    )


def build_tokenizer() -> HFTokenizer:
    """Byte-level BPE: 256 bytes + merges trained on a small corpus, padded to 100256 ordinary
    tokens, then the 96 added tokens 100256..100351 (all special), exactly Phi-4's id layout."""
    return HFTokenizer.from_str(_tokenizer_json())  # a fresh object: callers may add tokens


@functools.cache
def _tokenizer_json() -> str:
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(_CORPUS, trainer=trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(spec["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    for word in _filler_words():
        if len(vocab) == FIRST_ADDED:
            break
        vocab.setdefault(word, len(vocab))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    for tid, content in special_tokens().items():
        backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        assert backend.token_to_id(content) == tid, (content, backend.token_to_id(content), tid)
    assert backend.get_vocab_size(with_added_tokens=True) == VOCAB
    return backend.to_str()


def tokenizer_config(release: Release) -> dict[str, object]:
    """tokenizer_config.json as Phi-4's first release shipped it, or with its bugs fixed."""
    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in special_tokens().items()
    }
    first = release == "first"
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>",
        "chat_template": PHI4_FIRST_RELEASE_TEMPLATE if first else PHI4_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>" if first else "<|im_end|>",
        "model_max_length": CONTEXT,
        "pad_token": "<|endoftext|>" if first else "<|dummy_85|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
    }


def write_tokenizer(
    folder: Path, release: Release = "first", files: Literal["json", "vocab", "both"] = "both"
) -> HFTokenizer:
    """tokenizer.json and/or vocab.json + merges.txt, plus tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    backend = build_tokenizer()
    if files in ("json", "both"):
        backend.save(str(folder / "tokenizer.json"))
    if files in ("vocab", "both"):
        backend.model.save(str(folder))  # vocab.json (ordinary tokens only) + merges.txt
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(release), indent=1))
    specials = {"bos_token": "<|endoftext|>", "eos_token": tokenizer_config(release)["eos_token"]}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return backend


def make_model(seed: int = 0, im_end_gain: float = 0.0) -> Phi3ForCausalLM:
    """Random fp32 model whose weights are exactly bf16-representable (Phi-4 ships bf16).

    ``im_end_gain`` scales lm_head's <|im_end|> row: its logit then swings far above or below the
    others, so greedy decoding ends the turn within a few tokens instead of running to max_tokens.
    """
    cfg = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rope_theta=ROPE_THETA,
        rms_norm_eps=EPS,
        max_position_embeddings=CONTEXT,
        original_max_position_embeddings=CONTEXT,
        bos_token_id=ENDOFTEXT,
        eos_token_id=ENDOFTEXT,  # as in Phi-4's config.json: <|im_end|> is not named
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(cfg).eval()
    _randomize(model, seed)
    with torch.no_grad():
        if im_end_gain:
            model.lm_head.weight[IM_END] *= im_end_gain
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def write_checkpoint(
    folder: Path, model: Phi3ForCausalLM, release: Release = "first", tokenizer_files: str = "both"
) -> Path:
    """The model as 2 bf16 safetensors shards + index, config.json, and the tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    # Embedding and lm_head are 6.4 MB each in bf16: a 7 MB limit gives exactly 2 shards. A bf16 state
    # dict rather than model.to(bf16): that would also round the fp32 rope buffer of the reference model.
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(folder, max_shard_size="7MB", state_dict=bf16)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=1))
    gen = folder / "generation_config.json"
    if gen.exists():  # keep it consistent with config.json: only <|endoftext|>
        data = json.loads(gen.read_text())
        data["eos_token_id"] = ENDOFTEXT
        gen.write_text(json.dumps(data))
    write_tokenizer(folder, release, tokenizer_files)  # type: ignore[arg-type]
    return folder


def write_gguf(
    model: Phi3ForCausalLM,
    path: Path,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    release: Release = "first",
    with_tokenizer: bool = True,
) -> Path:
    """llama.cpp's phi3 layout (fused attn_qkv, ffn_up = [gate; up]) with Phi-4's tokenizer metadata.

    ``with_tokenizer=False`` leaves the 100352-token vocabulary out: gguf's reader takes seconds to
    parse it, and logits tests do not need it.
    """
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = GGUFWriter(str(path), "phi3")
    writer.add_name("Phi 4 miniature")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_dimension_count(HEAD_DIM)
    if with_tokenizer:
        backend = build_tokenizer()
        spec = json.loads(backend.to_str())["model"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("dbrx")
        writer.add_token_list([backend.id_to_token(i) for i in range(VOCAB)])
        writer.add_token_types([3 if i >= FIRST_ADDED else 1 for i in range(VOCAB)])  # 3: control
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
        first = release == "first"
        writer.add_bos_token_id(ENDOFTEXT)
        writer.add_eos_token_id(ENDOFTEXT if first else IM_END)
        writer.add_pad_token_id(ENDOFTEXT if first else PAD)
        writer.add_add_bos_token(False)
        writer.add_chat_template(PHI4_FIRST_RELEASE_TEMPLATE if first else PHI4_CHAT_TEMPLATE)

    _add(writer, "token_embd.weight", sd["model.embed_tokens.weight"], qtype)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        _add(writer, f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], qtype)
        _add(writer, f"blk.{i}.attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"], qtype)
        _add(writer, f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], qtype)
        _add(writer, f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], qtype)
        _add(writer, f"blk.{i}.ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"], qtype)
        _add(writer, f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], qtype)
    _add(writer, "output_norm.weight", sd["model.norm.weight"], qtype)
    _add(writer, "output.weight", sd["lm_head.weight"], qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected_phi4_prompt(messages: list[dict[str, str]]) -> str:
    """What Phi-4's template must produce for system/user/assistant turns plus the generation prompt."""
    return (
        "".join(f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>" for m in messages)
        + "<|im_start|>assistant<|im_sep|>"
    )


def greedy_reference(model: Phi3ForCausalLM, prompt_ids: list[int], max_new: int) -> list[int]:
    """transformers' greedy continuation, stopping after <|im_end|> or <|endoftext|>."""
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt in (IM_END, ENDOFTEXT):
                break
    return out

