"""Tiny random FLUX.1-dev snapshots built on the fly (no downloads), shared by the converter,
tokenizer and pipeline tests.

`make_tiny_snapshot(root)` writes the diffusers layout of black-forest-labs/FLUX.1-dev with
every component tiny and random but mutually consistent, so `diffusers.FluxPipeline.
from_pretrained(root)` loads it and runs: the transformer's text dims are T5's d_model and
CLIP's hidden size, its in_channels are 4 x the VAE's 16 latent channels (2x2 packing), the
tokenizers' vocabularies fit the encoders' embeddings, CLIP keeps FLUX's 77 positions.
Files mimic the real snapshot where it matters to loaders: T5 sharded with an index, CLIP in
one file with FLUX's `text_model.` names and the `position_ids` buffer older transformers saved,
VAE in one diffusion_pytorch_model.safetensors, the transformer sharded.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from flaxflux.model_folder import FLUX_MODEL_INDEX

# --- tokenizers: a sentencepiece T5 model trained on a small corpus, a hand-written CLIP BPE ----------

WORDS = ("a red circle blue square green triangle cat dog photo of the on in with bright dark small "
         "large painting city night river mountain").split()
CLIP_MERGES = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"),
               ("o", "n</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"), ("circl", "e</w>"),
               ("d", "o"), ("do", "g</w>")]


def spiece_model() -> bytes:
    """A 48-piece unigram sentencepiece model (pad 0, </s> 1, unk 2: T5's special ids)."""
    import sentencepiece as spm

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=48, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    return buf.getvalue()


def clip_vocab() -> dict[str, int]:
    """Byte-level symbols, their </w> forms, CLIP_MERGES, then <|startoftext|>, <|endoftext|>
    (the largest id, as in CLIP-L: argmax-of-ids pooling finds the first EOS)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # the 256 byte-level symbols
    vocab = {a: i for i, a in enumerate(alphabet)}
    vocab.update({a + "</w>": len(alphabet) + i for i, a in enumerate(alphabet)})
    for a, b in CLIP_MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_tokenizers(root: Path) -> dict[str, Any]:
    """tokenizer/ (vocab.json, merges.txt, tokenizer_config.json) and tokenizer_2/ (spiece.model
    + what transformers' T5TokenizerFast writes), as in a FLUX.1-dev snapshot.
    Returns {"vocab": CLIP vocab, "spm": sentencepiece model bytes, "t5_vocab_size": int}."""
    import transformers

    root = Path(root)
    clip = root / "tokenizer"
    clip.mkdir(parents=True)
    vocab = clip_vocab()
    (clip / "vocab.json").write_text(json.dumps(vocab))
    (clip / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
    (clip / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))

    model = spiece_model()
    t5_dir = root / "tokenizer_2"
    t5_dir.mkdir()
    (t5_dir / "spiece.model").write_bytes(model)
    t5 = transformers.T5TokenizerFast.from_pretrained(str(t5_dir), local_files_only=True)
    t5.save_pretrained(str(t5_dir))
    (t5_dir / "spiece.model").write_bytes(model)  # FLUX's tokenizer_2/ keeps it beside tokenizer.json
    return dict(vocab=vocab, spm=model, t5_vocab_size=len(t5))


# --- models ------------------------------------------------------------------------------------------

T5_CONFIG = dict(vocab_size=160, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                 feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
# eos_token_id 2: FLUX's (legacy openai) CLIP config, pooled at argmax(input_ids) = the first EOS
CLIP_CONFIG = dict(vocab_size=len(CLIP_MERGES) + 2 * 256 + 2, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                   hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# norm_num_groups 32 and FLUX's scaling / shift: a BFL ae.safetensors of this VAE converts with the
# FLUX.1 preset for what tensor shapes cannot tell
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64), layers_per_block=1,
                  norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False, use_post_quant_conv=False,
                  scaling_factor=0.3611, shift_factor=0.1159, sample_size=32)
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=4 * VAE_CONFIG["latent_channels"], num_layers=1,
                          num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=T5_CONFIG["d_model"], pooled_projection_dim=CLIP_CONFIG["hidden_size"],
                          guidance_embeds=True, axes_dims_rope=(4, 6, 6))
SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
MODEL_INDEX = FLUX_MODEL_INDEX


def _perturb(model, seed: int) -> None:
    """Random biases and norm scales: defaults (0 / 1) would hide mapping mistakes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def _save_clip_flux_style(model, folder: Path) -> None:
    """FLUX's text_encoder/model.safetensors: `text_model.` names (older transformers) and the
    int64 position_ids buffer; transformers 5 writes neither."""
    from safetensors.numpy import load_file, save_file

    model.save_pretrained(folder)
    path = folder / "model.safetensors"
    sd = {f"text_model.{k}": v for k, v in load_file(str(path)).items()}
    sd["text_model.embeddings.position_ids"] = np.arange(CLIP_CONFIG["max_position_embeddings"], dtype=np.int64)[None]
    save_file(sd, str(path), metadata={"format": "pt"})


def make_tiny_snapshot(root: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write a tiny random FLUX.1-dev snapshot at `root` (diffusers layout, see the module
    docstring). Returns {"root", "vocab", "spm"} (tokenizer facts the tokenizer tests check)."""
    import diffusers
    import torch
    import transformers

    from conftest import make_reference

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    toks = write_tokenizers(root)
    assert toks["t5_vocab_size"] <= T5_CONFIG["vocab_size"], toks["t5_vocab_size"]
    assert len(toks["vocab"]) == CLIP_CONFIG["vocab_size"]

    make_reference(TRANSFORMER_CONFIG, seed=seed).save_pretrained(root / "transformer", max_shard_size="50KB")

    torch.manual_seed(seed + 1)
    t5 = transformers.T5EncoderModel(transformers.T5Config(**T5_CONFIG)).eval()
    _perturb(t5, seed + 1)
    t5.save_pretrained(root / "text_encoder_2", max_shard_size="16KB")  # sharded + index, like FLUX's

    torch.manual_seed(seed + 2)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIG)).eval()
    _perturb(clip, seed + 2)
    _save_clip_flux_style(clip, root / "text_encoder")

    torch.manual_seed(seed + 3)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG).eval()
    _perturb(vae, seed + 3)
    vae.save_pretrained(root / "vae")

    diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return dict(root=root, vocab=toks["vocab"], spm=toks["spm"])
