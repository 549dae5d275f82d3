"""AnyRes geometry (LLaVA-NeXT; transformers' image_processing_llava_next.py and modeling_llava_next.py), shared by
the processor and the model.

An image of size (H, W) is resized into the best-fitting grid resolution from `pinpoints`, cut into crops of the
vision tower's size, and encoded with one extra squashed "base" crop. After the projector, the grid's features are
stitched back into one feature map, the padding added by the resize is cut off ("unpad"), and a learned newline
vector ends every row. All sizes are (height, width), transformers' convention; the original LLaVA code uses
PIL's (width, height) and reads pinpoints as (w, h), which differs only on exact ties.
"""

import math


def select_best_resolution(size, pinpoints):
    """The pinpoint (h, w) that keeps the most of the image's pixels, then wastes the fewest. Ties: first wins."""
    height, width = size
    best, best_effective, best_waste = None, -1, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = h * w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best


def grid_shape(size, pinpoints, crop):
    """(rows, cols) of crops for an image of size (H, W)."""
    h, w = select_best_resolution(size, pinpoints)
    return h // crop, w // crop


def num_crops(size, pinpoints, crop):
    """Crops the processor makes for one image: the grid plus the base image."""
    rows, cols = grid_shape(size, pinpoints, crop)
    return rows * cols + 1


def resized_size(size, target):
    """Aspect-preserving size of an (H, W) image fitted into target (h, w) (transformers' get_patch_output_size)."""
    height, width = size
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def unpadded_shape(size, feat_h, feat_w):
    """Rows and columns of a (feat_h, feat_w) grid feature map left after removing the resize padding.

    The image was fitted into the grid preserving its aspect ratio and centred, so the padding sits on two opposite
    sides; `round(., 7)` guards float error exactly as transformers does (the original LLaVA code truncates).
    Returns (top, bottom, left, right) slice bounds.
    """
    height, width = size
    if width / height > feat_w / feat_h:
        new_h = int(round(height * (feat_w / width), 7))
        pad = (feat_h - new_h) // 2
        return pad, feat_h - pad, 0, feat_w
    new_w = int(round(width * (feat_h / height), 7))
    pad = (feat_w - new_w) // 2
    return 0, feat_h, pad, feat_w - pad


def num_image_tokens(size, pinpoints, crop, grid, strategy="default"):
    """Image tokens for one image: base crop + unpadded grid + one newline per grid row."""
    rows, cols = grid_shape(size, pinpoints, crop)
    top, bottom, left, right = unpadded_shape(size, rows * grid, cols * grid)
    h, w = bottom - top, right - left
    base = grid * grid + (1 if strategy == "full" else 0)      # "full" keeps the CLS token
    return base + h * (w + 1)
