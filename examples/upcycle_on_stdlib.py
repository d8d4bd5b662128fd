"""Sparse upcycling on real text: pre-train a tiny dense T5 on the Python standard library's
own source, convert it to a Switch model, then train dense and Switch on for the same steps.

The Switch model has ~4x the parameters at the same compute per token. Bytes are tokens, so
nothing is downloaded. Run: .venv/bin/python examples/upcycle_on_stdlib.py [--steps 150]
"""
import argparse
import copy
import sysconfig
import time
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

import moeify

OFFSET = 3  # ids 0-2 are T5's pad / eos / unk; byte b is token b + 3


def corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + OFFSET


def batches(text: torch.Tensor, batch: int, src: int, tgt: int, seed: int):
    """Seq2seq next-chunk prediction: read `src` bytes, write the `tgt` bytes that follow."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, len(text) - src - tgt, (batch, 1), generator=g)
        window = text[start + torch.arange(src + tgt)]
        yield {"input_ids": window[:, :src].contiguous(), "labels": window[:, src:].contiguous()}


def train(model, data, steps: int, lr: float, label: str) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    recent = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(data)
        if any(isinstance(m, moeify.SwitchFFN) for m in model.modules()):
            with moeify.router_losses(model) as losses:
                out = model(**batch)
            loss, extra = out.loss + losses.total(), f" dropped {losses.dropped_fraction():5.1%}"
        else:
            out = model(**batch)
            loss, extra = out.loss, ""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [out.loss.item()])[-20:]
        if step % max(1, steps // 5) == 0 or step == steps:
            print(f"  {label:6s} step {step:4d}  loss {sum(recent) / len(recent):.3f}{extra}"
                  f"  ({time.perf_counter() - start:.0f}s)")
    return sum(recent) / len(recent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    text = corpus()
    print(f"corpus: {len(text):,} bytes of the standard library's source")
    config = T5Config(vocab_size=256 + OFFSET, d_model=128, d_ff=512, d_kv=32, num_heads=4, num_layers=2,
                      feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    dense = T5ForConditionalGeneration(config)
    print("pre-training the dense model")
    train(dense, batches(text, 16, 64, 16, seed=0), args.pretrain_steps, 1e-3, "dense")

    sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=args.experts, every=1))
    d, s = moeify.summarize(dense), moeify.summarize(sparse)
    print(f"upcycled: {d.total_params:,} -> {s.total_params:,} parameters, "
          f"{s.active_params:,} active per token")
    print("continuing both from the same checkpoint, on the same batches")
    dense_loss = train(copy.deepcopy(dense), batches(text, 16, 64, 16, seed=1), args.steps, 1e-3, "dense")
    switch_loss = train(sparse, batches(text, 16, 64, 16, seed=1), args.steps, 1e-3, "switch")
    print(f"final loss: dense {dense_loss:.3f}, switch {switch_loss:.3f}")


if __name__ == "__main__":
    main()
