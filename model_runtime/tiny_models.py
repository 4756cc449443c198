"""Tiny causal LMs built offline from configs: random weights, a tokenizer trained in code.

Tests, benchmarks and `make demo` use these instead of downloading anything (no hub access at run
time). They are saved with `save_pretrained`, so every loader keeps its real code path.

    python -m model_runtime.tiny_models llama /tmp/tiny-llama
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Arch = Literal["llama", "gpt2", "llama-tied", "gpt-neox", "opt"]

_CORPUS = [
    "The Eiffel Tower is in the city of Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "Deep inference lets researchers look inside large language models.",
    "NNsight traces a model and saves hidden states for analysis.",
    "Madison Square Garden is located in New York City.",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(vocab_size: int = 300):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer trained on a few sentences (takes ~15 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast: Any = PreTrainedTokenizerFast  # untyped constructor
    return fast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_config(arch: Arch, vocab_size: int, **overrides: object) -> PretrainedConfig:
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    cfg: PretrainedConfig
    if arch == "gpt-neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        )
    elif arch == "opt":
        cfg = OPTConfig(
            vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=3,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=(arch == "llama-tied"), bos_token_id=1, eos_token_id=2, pad_token_id=3,
        )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tiny_model(
    arch: Arch,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    safe_serialization: bool = True,
    config_overrides: dict[str, object] | None = None,
) -> Path:
    """Build and save a tiny model + tokenizer into `out_dir`; return the directory.

    `max_shard_size` (e.g. "100KB") writes a sharded checkpoint with an index file;
    `safe_serialization=False` writes `pytorch_model.bin` (no safetensors headers to read);
    `config_overrides` (e.g. `{"hidden_size": 1024, "num_hidden_layers": 8}`) builds a bigger one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    overrides = dict(config_overrides or {})
    # A vocabulary larger than the tokenizer's is allowed (sizing benchmarks use real models' sizes).
    vocab_size = int(overrides.pop("vocab_size", len(tokenizer)))  # type: ignore[call-overload]
    config = build_config(arch, vocab_size, **overrides)
    auto: Any = AutoModelForCausalLM  # untyped classmethods
    model = auto.from_config(config, dtype=getattr(torch, dtype))
    model.eval()
    save_kwargs: dict[str, object] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)
    if not safe_serialization:
        _rewrite_as_pickle(out)
    tokenizer.save_pretrained(out)
    return out


def _rewrite_as_pickle(out: Path) -> None:
    """Turn `model.safetensors` into `pytorch_model.bin`.

    transformers 5 ignores `save_pretrained(safe_serialization=False)`, yet the evaluator's
    meta-device fallback needs checkpoints that have no safetensors headers to read.
    """
    import torch
    from safetensors.torch import load_file

    shards = sorted(out.glob("model*.safetensors"))
    if len(shards) != 1:
        raise ValueError("a pickled tiny checkpoint must be a single file: drop max_shard_size")
    torch.save(load_file(shards[0]), out / "pytorch_model.bin")
    shards[0].unlink()


def ensure_tiny_model(arch: Arch, out_dir: str | Path) -> Path:
    """Build the model unless `out_dir` already holds one (idempotent for `make demo`)."""
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    return build_tiny_model(arch, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", choices=["llama", "gpt2", "llama-tied", "gpt-neox", "opt"])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default=None)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.arch, args.out_dir, seed=args.seed, max_shard_size=args.max_shard_size)
    print(f"built tiny {args.arch} in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
