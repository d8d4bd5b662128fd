"""Convert your own nn.Module (a nanoGPT-style MLP stack), train a step with router losses, save, load.

Run: .venv/bin/python examples/custom_module.py
"""
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import moeify


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(d), MLP(d)

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


torch.manual_seed(0)
dense = TinyLM()
sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=8))  # blocks 1 and 3 become Switch layers
print([s.name for s in sparse.moeify_record.sites])
summary = moeify.summarize(sparse)
print(f"{summary.total_params:,} parameters, {summary.active_params:,} active per token")

ids = torch.randint(0, 256, (4, 32))
optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
sparse.train()
with moeify.router_losses(sparse) as losses:
    logits = sparse(ids[:, :-1])
    lm_loss = F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
    loss = lm_loss + losses.total()
loss.backward()
optimizer.step()
print(f"lm loss {lm_loss.item():.3f}, router losses {losses.total().item():.4f}, "
      f"dropped {losses.dropped_fraction():.1%} of tokens")

with tempfile.TemporaryDirectory() as tmp:
    moeify.save(sparse, f"{tmp}/tiny-switch")
    again = moeify.load(f"{tmp}/tiny-switch", model=TinyLM())  # custom classes supply their structure
    sparse.eval(), again.eval()
    assert torch.equal(sparse(ids), again(ids))
    print("saved and loaded: outputs identical")
