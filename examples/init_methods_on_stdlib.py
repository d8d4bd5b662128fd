"""Initialisation methods on real text: pre-train a tiny dense T5 on the Python standard library's
own source, then convert it with each method and measure it before any further training.

  upcycle --upcycle-scale none / auto   held-out loss of the fresh Switch model against the dense one
  --init moefy                          how closely each token's top-1 / top-2 neuron groups give the FFN
  --router-init hidden / random         expert-load balance (coefficient of variation) on the text

Bytes are tokens, so nothing is downloaded. Run: .venv/bin/python examples/init_methods_on_stdlib.py
"""
import argparse
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration

import moeify
from moeify.conversion.text import stdlib_text, text_batches, token_ids

VOCAB = 256 + 3  # byte b is token b + 3, past T5's pad / eos / unk


@torch.no_grad()
def loss(model, batches) -> float:
    model.eval()
    return sum(model(input_ids=b["input_ids"], labels=b["decoder_input_ids"]).loss.item()
               for b in batches) / len(batches)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = token_ids(stdlib_text(), VOCAB)
    train, held = ids[:1_500_000], ids[1_500_000:]
    dense = T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=128, d_ff=512, d_kv=32, num_heads=4, num_layers=2, feed_forward_proj="relu",
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    e = args.experts
    # MoEfication's baseline: the same FFNs untrained, whose neurons have nothing in common to cluster.
    untrained = moeify.convert(dense, moeify.MoEConfig(num_experts=e, every=1, init="moefy")).moeify_record
    optimizer = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    start = time.perf_counter()
    dense.train()
    for b in text_batches(train, args.pretrain_steps, 16, 64, True):
        out = dense(input_ids=b["input_ids"], labels=b["decoder_input_ids"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    batches = list(text_batches(held, 4, 8, 64, True))
    base = loss(dense, batches)
    print(f"dense: pre-trained {args.pretrain_steps} steps in {time.perf_counter() - start:.0f}s, "
          f"held-out loss {base:.4f}")
    for k in (1, 2):
        moe = dict(num_experts=e, top_k=k, every=1, dropless=True)
        none, auto = (loss(moeify.convert(dense, moeify.MoEConfig(**moe, upcycle_scale=s)), batches)
                      for s in ("none", "auto"))
        print(f"upcycle top-{k}: scale none {none:.4f} ({none / base - 1:+.1%}), "
              f"auto {auto:.4f} ({auto / base - 1:+.1%})")
    moefied = moeify.convert(dense, moeify.MoEConfig(num_experts=e, every=1, init="moefy"))
    reports = moefied.moeify_record.init_reports.values()
    before = untrained.init_reports.values()
    print(f"moefy: experts {512 // e} wide; relative error of each token's top-1 expert "
          f"{mean(r.top1_error for r in reports):.3f}, top-2 {mean(r.top2_error for r in reports):.3f} "
          f"(mean of {len(reports)} layers; untrained: {mean(r.top1_error for r in before):.3f}, "
          f"{mean(r.top2_error for r in before):.3f})")
    hidden = moeify.convert(dense, moeify.MoEConfig(num_experts=e, every=1, router_init="hidden"))
    reports = hidden.moeify_record.init_reports.values()
    print(f"router load CV (std / mean of tokens per expert, mean of {len(reports)} layers): "
          f"hidden {mean(r.load_cv for r in reports):.2f}, random {mean(r.random_load_cv for r in reports):.2f}")


if __name__ == "__main__":
    main()
