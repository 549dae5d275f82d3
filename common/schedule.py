"""The learning-rate schedule both trainers use: linear warm-up, then cosine decay (paper: 3% warm-up)."""

import math


def lr_factor(step, total, warmup_ratio, min_ratio=0.0):
    """The factor on each group's base lr at `step` (0-based) of `total`: linear warm-up over the first
    warmup_ratio of the steps, then cosine decay to min_ratio."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def set_lr(optimizer, factor):
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
