"""Generate the default model: a small random-weight Llama and an offline tokenizer.

Nothing is downloaded. The output is an ordinary Hugging Face model directory
(config.json, model.safetensors, tokenizer.json, ...), so everything that takes the
default model takes a real one by path the same way.

    python -m layerkv.tools.make_model --out models/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Text the byte-level BPE merges are learned from. Byte-level BPE covers every
# input string whatever the corpus, so this only shapes which merges exist.
_CORPUS = """\
Once upon a time there was a small model that lived on a computer with two cores.
It had random weights, so it spoke nonsense, but it spoke the same nonsense every
time it was asked the same question, and that made it very useful for tests.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Time to first token is the time a user waits before the first word appears.
Long prompts wait in a queue until the key-value cache has room for every layer.
LayerKV lets a request start with some layers kept in host memory instead.
Kubernetes runs the workers; an operator adds workers when the service misses its
latency objectives, and removes them when they sit idle.
def main(argv=None):\n    return 0\nfor i in range(10):\n    print(i, i * i)\n
{"prompt": "hello", "max_tokens": 16, "temperature": 0.0}
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159
"""


@dataclass(frozen=True)
class ModelShape:
    """Shape of the generated Llama. Defaults fit vLLM's CPU attention (head_dim 32)."""

    vocab_size: int = 1024  # upper bound; the trained vocabulary may be smaller
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    seed: int = 0


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the embedded corpus, as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so rarer pairs still reach the merge threshold.
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_model(out: Path, shape: ModelShape) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_size)
    config = LlamaConfig(
        # The tiny corpus yields fewer merges than asked for; size the embedding to
        # the real vocabulary so the model never emits an id the tokenizer lacks.
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init makes logits less flat, so greedy decoding does not
    # collapse into one repeated token: output comparisons then mean something.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "layerkv-model.json").write_text(json.dumps(asdict(shape), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    defaults = ModelShape()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("models/tiny-llama"))
    for name, value in asdict(defaults).items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    ap.add_argument("--force", action="store_true", help="overwrite an existing model")
    args = ap.parse_args(argv)
    shape = ModelShape(**{k: getattr(args, k) for k in asdict(defaults)})
    if shape.hidden_size % shape.num_attention_heads:
        ap.error("--hidden-size must be a multiple of --num-attention-heads")
    marker = args.out / "layerkv-model.json"
    if marker.exists() and not args.force and json.loads(marker.read_text()) == asdict(shape):
        print(f"model already present: {args.out}")
        return 0
    make_model(args.out, shape)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
