"""Phi-4 checkpoints: the miniature Phi-4 folder and its GGUF copies load through our decoder with
transformers' logits, its tokenizer and template behave as Phi-4's, and loading stays shard-sized."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    filter_repo_objects,
)
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

from phiserve.models.loader import load_model, resolve_model
from phiserve.models.safetensors_loader import read_hf_config, safetensors_files
from phiserve.tokenizer.chat_template import ChatTemplate
from phiserve.tokenizer.stops import fallback_chat_template, generation_config_eos_ids, stop_token_ids
from phiserve.tokenizer.tokenizer import Tokenizer, read_gguf_metadata
from tests.models import phi4_miniature as mini
from tests.models.tiny_checkpoints import _randomize

Q = GGMLQuantizationType
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello world, what is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "Tell me a joke about the sea."},
]
EXPECTED_PROMPT = (
    "<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
    "<|im_start|>user<|im_sep|>Hello world, what is 2+2?<|im_end|>"
    "<|im_start|>assistant<|im_sep|>It is 4.<|im_end|>"
    "<|im_start|>user<|im_sep|>Tell me a joke about the sea.<|im_end|>"
    "<|im_start|>assistant<|im_sep|>"
)
IDS = torch.randint(0, mini.VOCAB, (24,), generator=torch.Generator().manual_seed(1))
IDS[[0, 2, 9]] = torch.tensor([mini.IM_START, mini.IM_SEP, mini.IM_END])  # specials' rows matter too


@pytest.fixture(scope="module")
def model() -> Phi3ForCausalLM:
    return mini.make_model(seed=0, im_end_gain=8.0)


@pytest.fixture(scope="module")
def phi4_dir(tmp_path_factory, model):
    return mini.write_checkpoint(tmp_path_factory.mktemp("phi4") / "phi-4-mini", model, release="first")


@pytest.fixture(scope="module")
def folder_logits(phi4_dir) -> torch.Tensor:
    """Our fp32 logits for IDS from the safetensors folder (the GGUF tests compare against them)."""
    return _ours(phi4_dir)


def _ours(spec, dtype=torch.float32, ids=IDS) -> torch.Tensor:
    _, decoder, _ = load_model(str(spec), dtype=dtype)
    with torch.no_grad():
        return decoder(ids, torch.arange(len(ids)))


def _hf(model: torch.nn.Module, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


# ---------------------------------------------------------------------- the safetensors folder


def test_folder_layout_and_config(phi4_dir) -> None:
    assert [p.name for p in safetensors_files(phi4_dir)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    raw = json.loads((phi4_dir / "config.json").read_text())
    assert raw["eos_token_id"] == mini.ENDOFTEXT and raw["dtype"] == "bfloat16"  # as Phi-4 ships
    cfg = read_hf_config(phi4_dir)
    assert (cfg.architecture, cfg.vocab_size, cfg.rope_theta, cfg.max_position_embeddings) == (
        "phi3",
        100352,
        250000.0,
        16384,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (4, 1, 8, False)
    assert cfg.eos_token_ids == [mini.ENDOFTEXT]


def test_generation_config_eos_ids(phi4_dir, tmp_path) -> None:
    assert generation_config_eos_ids(phi4_dir) == [mini.ENDOFTEXT]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [100257, 100265]}))
    assert generation_config_eos_ids(tmp_path) == [100257, 100265]
    assert generation_config_eos_ids(tmp_path / "missing") == []


def test_hub_id_downloads_what_phi4_needs(phi4_dir, monkeypatch) -> None:
    """`--model microsoft/phi-4`: the snapshot's patterns keep every file Phi-4 needs (merges.txt too)
    and skip the rest; the folder then loads as any local one."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):  # noqa: ANN202 - stands in for the network
        calls.append(kwargs)
        return str(phi4_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = resolve_model("microsoft/phi-4")
    assert (resolved.kind, resolved.served_name, resolved.path) == ("hf", "microsoft/phi-4", phi4_dir)
    repo_files = [f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)] + [
        "model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
    ]  # fmt: skip
    patterns = {k: calls[0][k] for k in ("allow_patterns", "ignore_patterns")}
    kept = filter_repo_objects([*repo_files, "README.md", "LICENSE", "original/x.pth"], **patterns)
    assert list(kept) == repo_files


def test_fp32_logits_match_transformers(folder_logits, model) -> None:
    # The checkpoint is bf16 and the reference holds the same bf16-exact values in fp32.
    torch.testing.assert_close(folder_logits, _hf(model), atol=1e-4, rtol=1e-4)


def test_bf16_logits_close_to_transformers(phi4_dir, model) -> None:
    """Tolerance: 2e-2 *relative* (norm of the difference over the norm of the logits, and max error
    over max logit). An absolute 2e-2 cannot hold in bf16: logits here reach ~15, where one bf16 ulp
    is 0.0625. Measured ~1.1e-2 for both ours and transformers' own bf16 model against fp32."""
    ours, ref = _ours(phi4_dir, torch.bfloat16), _hf(model)
    assert ours.dtype == torch.float32
    assert (ours - ref).norm() <= 2e-2 * ref.norm()
    assert (ours - ref).abs().max() <= 2e-2 * ref.abs().max()
    hf_bf16 = Phi3ForCausalLM.from_pretrained(phi4_dir, dtype=torch.bfloat16).eval()
    # No worse than transformers' bf16 model itself (small slack for different rounding order).
    assert (ours - ref).norm() <= 1.5 * (_hf(hf_bf16) - ref).norm()


def test_progress_bar_on_stderr(phi4_dir, capsys) -> None:
    was_disabled = are_progress_bars_disabled()
    enable_progress_bars()
    try:
        load_model(str(phi4_dir))
    finally:
        if was_disabled:
            disable_progress_bars()
    err = capsys.readouterr().err
    assert "Loading safetensors shards" in err and "2/2" in err and "model-00002-of-00002" in err


# ---------------------------------------------------------------------- tokenizer, template, stops


@pytest.mark.parametrize("release", ["first", "fixed"])
@pytest.mark.parametrize("files", ["json", "vocab"])
def test_tokenizer_template_and_stops(tmp_path, release, files) -> None:
    """Both tokenizer file sets, both tokenizer_config.json releases: same ids as transformers, the
    exact Phi-4 prompt, and stops on <|im_end|> and <|endoftext|> though the config names only 100257."""
    mini.write_tokenizer(tmp_path, release, files)  # type: ignore[arg-type]
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.vocab_size == mini.VOCAB and tok.kind == "byte_level"
    phi4_ids = {"<|endoftext|>": 100257, "<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266}
    for token, tid in phi4_ids.items():
        assert tok.token_to_id(token) == tid and tok.is_special(tid)
    assert tok.eos_token == ("<|endoftext|>" if release == "first" else "<|im_end|>")

    template = ChatTemplate(tok.chat_template, tok.bos_token or "", tok.eos_token or "")
    assert template.render(MESSAGES, add_generation_prompt=True) == EXPECTED_PROMPT
    assert EXPECTED_PROMPT == mini.expected_phi4_prompt(MESSAGES)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == EXPECTED_PROMPT
    ids = tok.encode(EXPECTED_PROMPT)
    if files == "vocab":  # GPT-2 pre-tokenization, as transformers builds it from vocab.json + merges.txt
        assert ids == hf.encode(EXPECTED_PROMPT, add_special_tokens=False)
    else:  # tokenizer.json's own pipeline (cl100k split). transformers 5 swaps in GPT-2's regex for a
        # tokenizer-only folder whose tokenizer_class is GPT2Tokenizer, so the file is the reference.
        assert ids == HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(EXPECTED_PROMPT).ids
    assert ids[0] == mini.IM_START and ids[-1] == mini.IM_SEP and ids.count(mini.IM_END) == 4
    # Markers never reach the text; everything else round-trips.
    assert tok.decode(ids) == (
        "systemYou are a helpful assistant.userHello world, what is 2+2?"
        "assistantIt is 4.userTell me a joke about the sea.assistant"
    )
    assert tok.decode(ids, skip_special_tokens=False) == EXPECTED_PROMPT

    both = [mini.ENDOFTEXT, mini.IM_END]
    assert stop_token_ids(tok, template, [mini.ENDOFTEXT]) == both  # config.json's eos_token_id
    assert stop_token_ids(tok, template, []) == both  # whichever of the two tokenizer_config names


def test_vocab_json_listing_specials_still_splits_them(tmp_path) -> None:
    """A GPT-2 style vocab.json may list the special tokens as ordinary entries; they must still be
    matched whole in prompt text (else the template's markers are BPE'd into '<', '|', 'im', ...)."""
    mini.write_tokenizer(tmp_path, "first", "vocab")
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab.update({tok: i for i, tok in mini.special_tokens().items()})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = Tokenizer.from_hf_folder(tmp_path)
    ids = tok.encode("<|im_start|>user<|im_sep|>Hi<|im_end|>")
    assert ids[0] == mini.IM_START and ids[2] == mini.IM_SEP and ids[-1] == mini.IM_END
    assert tok.decode(ids) == "userHi"


def test_phi4_template_fallback_without_chat_template(tmp_path) -> None:
    mini.write_tokenizer(tmp_path, "fixed", "json")
    source = fallback_chat_template(Tokenizer.from_hf_folder(tmp_path))
    assert source is not None and ChatTemplate(source).render(MESSAGES) == EXPECTED_PROMPT


# ---------------------------------------------------------------------- GGUF (llama.cpp's phi3)


def _with_weights(template_model: Phi3ForCausalLM, state: dict[str, np.ndarray]) -> Phi3ForCausalLM:
    ref = Phi3ForCausalLM(template_model.config).eval()
    ref.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return ref


def test_gguf_f32_matches_safetensors(tmp_path, folder_logits, model) -> None:
    gguf_path = mini.write_gguf(model, tmp_path / "phi-4-mini-f32.gguf", with_tokenizer=False)
    from_gguf = _ours(gguf_path)
    torch.testing.assert_close(from_gguf, folder_logits, atol=1e-4, rtol=1e-4)


def test_gguf_q8_0_is_exact_on_its_own_weights(tmp_path, folder_logits, model) -> None:
    """Q8_0 phi3 GGUF: exactly the logits of transformers holding the dequantized weights, and close
    to the bf16 safetensors checkpoint."""
    gguf_path = mini.write_gguf(model, tmp_path / "phi-4-mini-q8_0.gguf", Q.Q8_0, with_tokenizer=False)
    from_gguf = _ours(gguf_path)
    state = {}
    for name, w in model.state_dict().items():
        w = w.float().numpy()
        state[name] = w if w.ndim == 1 else dequantize(quantize(w, Q.Q8_0), Q.Q8_0)
    torch.testing.assert_close(from_gguf, _hf(_with_weights(model, state)), atol=1e-4, rtol=1e-4)
    assert (from_gguf - folder_logits).norm() <= 3e-2 * folder_logits.norm()  # measured ~2.2e-2 (lm_head row x8 amplifies)


# Block geometry of the k-quants (llama.cpp's ggml-common.h): elements, bytes, offsets of fp16 scales.
_BLOCKS = {
    Q.Q4_K: (256, 144, (0, 2), 1e-4),  # d, dmin first; |w| <= d*63*15
    Q.Q5_K: (256, 176, (0, 2), 5e-5),  # |w| <= d*63*31
    Q.Q6_K: (256, 210, (208,), 2.5e-5),  # d last; |w| <= d*128*32
    Q.Q8_0: (32, 34, (0,), 8e-4),
}


def _raw_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: GGMLQuantizationType) -> np.ndarray:
    """Random quantized rows (gguf-py has no k-quant quantizer) with small finite fp16 scales."""
    elems, size, scale_offsets, scale = _BLOCKS[qtype]
    raw = rng.integers(0, 256, (rows, cols // elems, size), dtype=np.uint8)
    for off in scale_offsets:
        d = (rng.uniform(0.5, 1.0, (rows, cols // elems)) * scale).astype(np.float16)
        raw[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, cols // elems, 2)
    return raw.reshape(rows, -1)


def test_gguf_phi3_k_quants_load_exactly(tmp_path) -> None:
    """A phi3 GGUF mixing Q4_K/Q5_K/Q6_K/Q8_0 (as llama.cpp's Q4_K_M files do), fused attn_qkv and
    ffn_up = [gate; up] quantized: our logits equal transformers' on the dequantized weights."""
    hidden, inter, vocab = 256, 256, 128  # k-quant rows need multiples of 256
    cfg = Phi3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=mini.ROPE_THETA, rms_norm_eps=mini.EPS,
        max_position_embeddings=512, original_max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = Phi3ForCausalLM(cfg).eval()
    _randomize(model, seed=3)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    qtypes = {
        "token_embd.weight": ("model.embed_tokens.weight", Q.Q4_K),
        "output.weight": ("lm_head.weight", Q.Q6_K),
        "output_norm.weight": ("model.norm.weight", Q.F32),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        qtypes |= {
            f"blk.{i}.attn_norm.weight": (p + "input_layernorm.weight", Q.F32),
            f"blk.{i}.ffn_norm.weight": (p + "post_attention_layernorm.weight", Q.F32),
            f"blk.{i}.attn_qkv.weight": (p + "self_attn.qkv_proj.weight", (Q.Q5_K, Q.Q4_K)[i]),
            f"blk.{i}.attn_output.weight": (p + "self_attn.o_proj.weight", (Q.Q4_K, Q.Q8_0)[i]),
            f"blk.{i}.ffn_up.weight": (p + "mlp.gate_up_proj.weight", Q.Q4_K),
            f"blk.{i}.ffn_down.weight": (p + "mlp.down_proj.weight", Q.Q6_K),
        }
    writer = GGUFWriter(str(tmp_path / "kq.gguf"), "phi3")
    writer.add_block_count(2)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(mini.ROPE_THETA)
    writer.add_layer_norm_rms_eps(mini.EPS)
    writer.add_rope_dimension_count(hidden // 4)
    rng = np.random.default_rng(0)
    state = {}
    for gguf_name, (hf_name, qtype) in qtypes.items():
        w = sd[hf_name]
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, w)
            state[hf_name] = w
            continue
        raw = _raw_blocks(rng, w.shape[0], w.shape[1], qtype)
        writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
        state[hf_name] = dequantize(raw, qtype).reshape(w.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ids = torch.randint(0, vocab, (20,), generator=torch.Generator().manual_seed(4))
    ref = _hf(_with_weights(model, state), ids)
    assert torch.isfinite(ref).all() and ref.abs().max() > 1
    ours = _ours(tmp_path / "kq.gguf", ids=ids)
    torch.testing.assert_close(ours, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


def test_gguf_tokenizer_and_stops(tmp_path, model) -> None:
    """The phi3 GGUF's own tokenizer metadata (first release: EOS <|endoftext|>) gives Phi-4's ids,
    skips the markers in text, and stops on both ends."""
    path = mini.write_gguf(model, tmp_path / "phi-4-mini.gguf", Q.F32, release="first")
    tok = Tokenizer.from_gguf(path)
    assert tok.encode(EXPECTED_PROMPT) == mini.build_tokenizer().encode(EXPECTED_PROMPT).ids
    assert {mini.IM_START, mini.IM_END, mini.IM_SEP, mini.ENDOFTEXT} <= tok.special_token_ids
    template = ChatTemplate(tok.chat_template, tok.bos_token or "", tok.eos_token or "")
    assert template.render(MESSAGES) == EXPECTED_PROMPT
    eos = read_gguf_metadata(path, prefix="tokenizer.")["tokenizer.ggml.eos_token_id"]
    assert eos == mini.ENDOFTEXT  # what config_from_gguf reports for this file
    assert stop_token_ids(tok, template, [eos]) == [mini.ENDOFTEXT, mini.IM_END]


# ---------------------------------------------------------------------- peak host memory


_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from phiserve.models.config import ModelConfig
    from phiserve.models.decoder import Decoder
    from phiserve.models.loader import load_model, resolve_model

    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    # Building any module on the meta device lazily imports ~70 MB of torch internals, once:
    # do it before the baseline so only what loading costs is measured.
    with torch.device("meta"):
        Decoder(ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                            num_heads=1, num_kv_heads=1, head_dim=8))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (the kernel's exact peak RSS) to the current RSS
        reset = True
    except OSError:  # then VmHWM also covers the imports: a looser, still valid, upper bound
        reset = False
    before = status()
    _, decoder, _ = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
    after = status()
    model = sum(p.numel() * p.element_size() for p in decoder.parameters())
    print(json.dumps({"reset": reset, "rss_before": before["VmRSS"], "hwm_before": before["VmHWM"],
                      "peak": after["VmHWM"], "rss_after": after["VmRSS"], "model": model}))
    """
)


def _write_big_phi3(folder) -> list[int]:
    """Two ~59 MB bf16 shards of a Phi3-layout model (fused qkv/gate_up), written directly."""
    hidden, kv, inter, layers, vocab = 1024, 256, 2816, 4, 8192
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (0.02 * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(vocab, hidden)}, {}]
    for i in range(layers):
        p, shard = f"model.layers.{i}.", shards[i * 2 // layers]
        shard[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shard[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shard[p + "self_attn.qkv_proj.weight"] = rand(hidden + 2 * kv, hidden)
        shard[p + "self_attn.o_proj.weight"] = rand(hidden, hidden)
        shard[p + "mlp.gate_up_proj.weight"] = rand(2 * inter, hidden)
        shard[p + "mlp.down_proj.weight"] = rand(hidden, inter)
    shards[1]["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    shards[1]["lm_head.weight"] = rand(vocab, hidden)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["Phi3ForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 250000.0, "tie_word_embeddings": False,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return [(folder / f"model-{k + 1:05d}-of-00002.safetensors").stat().st_size for k in range(2)]


def test_peak_rss_stays_near_one_shard(tmp_path) -> None:
    """Loading a 2-shard bf16 checkpoint as fp32 (the CPU default) peaks below model + 1.5 x the
    largest shard: shards are memory-mapped one at a time and each tensor is converted on its own.
    Reading every shard before converting would need model + both shards (~354 MB here, over the
    ~324 MB bound); measured ~296 MB (the fp32 model 236 MB + the open shard's mapped pages)."""
    shard_sizes = _write_big_phi3(tmp_path)
    assert min(shard_sizes) > 50 * 2**20
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path), "float32"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not m["reset"] or m["hwm_before"] <= m["rss_before"] + 4 * 2**20, m  # the peak was reset
    assert m["model"] > 1.99 * sum(shard_sizes)  # fp32 parameters: twice the bf16 shards
    bound = m["model"] + 1.5 * max(shard_sizes)
    assert m["peak"] - m["rss_before"] < bound, {k: v / 2**20 for k, v in m.items()}
