"""Random weights for a model shape (benchmarks): made directly on the target device, never on the
host. normal(0, 0.02) everywhere, RMSNorm weights 1; deterministic per seed and device."""

from __future__ import annotations

import zlib

import torch

from ..config import ModelArgs


class RandomSource:
    """name -> a fresh random tensor, in our own parameter names (a tied head is not listed)."""

    column = "ours"

    def __init__(self, args: ModelArgs, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
        from .assemble import meta_model

        model = meta_model(args)
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied head once
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        self.gen = torch.Generator(device=self.device)

    def names(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        t = torch.empty(self.shapes[name], device=self.device, dtype=self.dtype)
        if name.endswith("norm.weight"):
            return t.fill_(1.0)
        self.gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))  # any order, same values
        return t.normal_(0.0, 0.02, generator=self.gen)


SHARD_BYTES = 5 * 1024**3  # like transformers' save_pretrained(max_shard_size="5GB")


def save_random_checkpoint(args: ModelArgs, out_dir, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           device: str = "cpu", shard_bytes: int = SHARD_BYTES, log=None) -> dict:
    """Write random weights of ``args`` as a Hugging Face checkpoint (config.json, safetensors in
    HF names, sharded with model.safetensors.index.json above ``shard_bytes``), holding one shard
    in host memory at a time, plus a tokenizer (see ``_write_tokenizer``). Returns a summary."""
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    from .checkpoint import umask as _umask
    from .names import mapping

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    source = RandomSource(args, device=device, dtype=dtype, seed=seed)
    split = {3: [args.q_size, args.kv_size, args.kv_size], 2: [args.intermediate_size] * 2}
    written: list[list[str]] = []  # tensor names per shard, in order
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        save_file(shard, str(out / f".part-{len(written):05d}"), metadata={"format": "pt"})
        written.append(list(shard))
        shard.clear()

    for ours, parts in mapping(args.n_layers, "hf", args.qkv_bias, args.tie_word_embeddings).items():
        t = source.get(ours)
        pieces = [t] if len(parts) == 1 else torch.split(t, split[len(parts)], dim=0)
        for name, piece in zip(parts, pieces):
            nbytes = piece.numel() * piece.element_size()
            if shard and size + nbytes > shard_bytes:
                flush()
                size = 0
            shard[name] = piece.to("cpu").contiguous()
            size += nbytes
            total += nbytes
        del t, pieces
    flush()
    n = len(written)
    files, weight_map = [], {}
    for i, names in enumerate(written):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / f".part-{i:05d}", out / name)
        os.chmod(out / name, 0o666 & ~_umask())
        files.append(name)
        weight_map.update({k: name for k in names})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = {**args.to_hf_config(), "torch_dtype": str(dtype).replace("torch.", "")}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tokenizer = _write_tokenizer(args, out)
    if log is not None:
        log(f"wrote {out}: {total / 1e9:.2f} GB of random weights in {n} file{'s' if n > 1 else ''}; {tokenizer}")
    return dict(path=str(out), bytes=total, files=files, tokenizer=tokenizer)


def _write_tokenizer(args: ModelArgs, out) -> str:
    """The default model's tokenizer when every id it makes fits the shape's vocabulary, else a
    word-level stand-in ("t0" ... one token per id) so that the checkpoint still loads."""
    from ..tokenizer import Tokenizer
    from . import default_model_path
    from . import gguf as gguf_src

    try:
        default = Tokenizer.from_gguf(gguf_src.open_reader(default_model_path()))
    except Exception:  # noqa: BLE001 - the default model is optional here
        default = None
    if default is not None and default.vocab_size <= args.vocab_size:
        default.save_pretrained(out)
        return f"tokenizer: the default model's ({default.vocab_size} tokens)"
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, args.vocab_size)}}
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    Tokenizer(tok, bos_token_id=1, eos_token_ids=[2], add_bos=True, chat_template=None,
              special_ids={0, 1, 2}, vocab_size=args.vocab_size).save_pretrained(out)
    return (f"tokenizer: a word-level stand-in ({args.vocab_size} tokens \"t0\"...; the default model's "
            f"{default.vocab_size if default else '?'} tokens do not fit)")
