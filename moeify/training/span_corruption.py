"""T5's span corruption: noise spans of the text become sentinels in the inputs and are the targets."""
from __future__ import annotations

import torch

from moeify.errors import MoeifyError, opt
from moeify.training.config import MEAN_NOISE_SPAN, NOISE_DENSITY


def span_counts(length: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_NOISE_SPAN) -> tuple[int, int]:
    """(noise tokens, noise spans) of a `length`-token example, counted as T5's random_spans_noise_mask:
    round(length * density) tokens kept within [1, length - 1], round(noise / mean_span) >= 1 spans.
    Python's round, like TensorFlow's, rounds halves to even."""
    noise = min(max(round(length * density), 1), length - 1)
    return noise, max(round(noise / mean_span), 1)


def example_lengths(inputs_length: int, density: float = NOISE_DENSITY,
                    mean_span: float = MEAN_NOISE_SPAN) -> tuple[int, int]:
    """(raw tokens per example, target length) for an encoder input of exactly `inputs_length` tokens,
    as T5's compute_input_and_target_lengths: the longest example whose kept tokens, one sentinel per
    span and EOS fit. Counts come from span_counts, so every example meets both lengths exactly."""
    def lengths(raw: int) -> tuple[int, int]:
        noise, spans = span_counts(raw, density, mean_span)
        return raw - noise + spans + 1, noise + spans + 1

    def longest(n: int) -> int:
        raw = n
        while lengths(raw + 1)[0] <= n:
            raw += 1
        return raw

    raw = longest(inputs_length)
    if lengths(raw)[0] != inputs_length:  # short inputs: even `inputs_length` raw tokens corrupt into more
        shortest = next(n for n in range(inputs_length + 1, 10 * inputs_length + 100)
                        if lengths(longest(n))[0] == n)
        raise MoeifyError(f"{opt('seq_len', inputs_length)} is too short for span corruption: its sentinels and "
                          f"EOS need more room than the noise frees; use a seq_len of at least {shortest}")
    return raw, lengths(raw)[1]


def _segment(items: int, segments: int, generator: torch.Generator) -> torch.Tensor:
    """`items` split at random into `segments` non-empty runs (their lengths, in order): T5's
    _random_segmentation, which shuffles `segments - 1` run starts among the `items - 1` gaps."""
    first = torch.zeros(items - 1, dtype=torch.long)
    first[torch.randperm(items - 1, generator=generator)[:segments - 1]] = 1
    return torch.bincount(torch.cat([first.new_zeros(1), first]).cumsum(0), minlength=segments)


def random_spans_noise_mask(length: int, generator: torch.Generator, density: float = NOISE_DENSITY,
                            mean_span: float = MEAN_NOISE_SPAN) -> torch.Tensor:
    """A (length,) bool mask, True on noise: non-noise and noise runs alternate, starting with non-noise
    and ending with noise, T5's random_spans_noise_mask without its optional roll."""
    noise, spans = span_counts(length, density, mean_span)
    noise_lengths = _segment(noise, spans, generator)  # drawn first, as T5 uses seeds[0] for them
    kept_lengths = _segment(length - noise, spans, generator)
    runs = torch.stack([kept_lengths, noise_lengths], dim=1).reshape(-1)
    return torch.repeat_interleave(torch.arange(2 * spans) % 2 == 1, runs)


def corrupt(tokens: torch.Tensor, mask: torch.Tensor, sentinel_ids: torch.Tensor,
            eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of one example: inputs are the tokens with noise span i replaced by sentinel i,
    targets each sentinel followed by its span; both end with EOS, as T5 appends it to both."""
    starts = mask & ~torch.cat([mask.new_zeros(1), mask[:-1]])
    sentinel = sentinel_ids[(starts.cumsum(0) - 1).clamp(min=0)]
    inputs = torch.where(starts, sentinel, tokens)[~mask | starts]
    # Targets: at each noise token, its span's sentinel (only at a span start), then the token itself.
    pairs = torch.stack([sentinel, tokens], dim=1).reshape(-1)
    targets = pairs[torch.stack([starts, mask], dim=1).reshape(-1)]
    eos = tokens.new_tensor([eos_id])
    return torch.cat([inputs, eos]), torch.cat([targets, eos])


def span_corruption(window: torch.Tensor, generator: torch.Generator, sentinel_ids: tuple[int, ...],
                    eos_id: int, density: float = NOISE_DENSITY,
                    mean_span: float = MEAN_NOISE_SPAN) -> dict[str, torch.Tensor]:
    """Model inputs of a (batch, raw) window, one mask per row drawn in row order: `input_ids` (batch,
    inputs length) and `labels` (batch, target length), lengths as example_lengths gives. Encoder-decoders
    shift `labels` right into their decoder inputs themselves (T5's _shift_right)."""
    sentinels = torch.tensor(sentinel_ids, dtype=window.dtype)
    rows = [corrupt(row, random_spans_noise_mask(len(row), generator, density, mean_span), sentinels, eos_id)
            for row in window]
    return {"input_ids": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}
