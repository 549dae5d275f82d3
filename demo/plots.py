"""Two small PNG plots drawn with PIL (the project does not depend on matplotlib): curves and grouped bars."""

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _frame(title, W, H):
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    d.text((10, 6), title, fill="black", font=font)
    return img, d, font


def line_plot(series, path, title="", xlabel="step", W=720, H=380, xticks=None, ylim=None, dots=False):
    """series: {name: [(x, y), ...]}; one line each, shared axes, a legend. xticks: [(x, label)] under the axis
    (default: the two ends); ylim: (low, high) instead of the data's range; dots: mark every point."""
    img, d, font = _frame(title, W, H)
    pts = [p for s in series.values() for p in s]
    if not pts:
        img.save(path)
        return path
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts) or 1
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0, y1 = ylim or ((0.0 if y0 >= 0 else y0 - 0.05 * (y1 - y0 or 1)), y1 + 0.05 * (y1 - y0 or 1))
    L, R, T, B = 60, W - 170, 30, H - 40

    def xy(x, y):
        return L + (R - L) * (x - x0) / ((x1 - x0) or 1), B - (B - T) * (y - y0) / ((y1 - y0) or 1)

    d.rectangle([L, T, R, B], outline=(150, 150, 150))
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        d.text((4, xy(x0, y)[1] - 7), f"{y:.3g}", fill=(80, 80, 80), font=font)
        d.line([L, xy(x0, y)[1], R, xy(x0, y)[1]], fill=(235, 235, 235))
    d.text(((L + R) / 2 - 20, B + 12), xlabel, fill="black", font=font)
    for x, label in xticks or [(x, f"{x:g}") for x in (x0, x1)]:
        d.text((xy(x, y0)[0] - 10, B + 4), label, fill=(80, 80, 80), font=font)
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        if len(s) > 1:
            d.line([xy(x, y) for x, y in s], fill=c, width=2)
        for x, y in s if dots else []:
            px, py = xy(x, y)
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        d.line([R + 12, T + 12 + 18 * i, R + 32, T + 12 + 18 * i], fill=c, width=3)
        d.text((R + 38, T + 5 + 18 * i), name, fill="black", font=font)
    img.save(path)
    return path


def bar_plot(groups, path, title="", ymax=1.0, W=760, H=380):
    """groups: {group label: {bar name: value}}; bars of the same name share a colour across groups."""
    img, d, font = _frame(title, W, H)
    names = list(dict.fromkeys(n for g in groups.values() for n in g))
    L, R, T, B = 50, W - 170, 30, H - 50
    d.rectangle([L, T, R, B], outline=(150, 150, 150))
    for k in range(5):
        y = B - (B - T) * k / 4
        d.line([L, y, R, y], fill=(235, 235, 235))
        d.text((6, y - 7), f"{ymax * k / 4:.2f}", fill=(80, 80, 80), font=font)
    slot = (R - L) / max(1, len(groups))
    width = slot * 0.8 / max(1, len(names))
    for gi, (g, bars) in enumerate(groups.items()):
        for ni, n in enumerate(names):
            if n not in bars:
                continue
            x = L + slot * gi + slot * 0.1 + ni * width
            y = B - (B - T) * min(bars[n], ymax) / ymax
            d.rectangle([x, y, x + width - 2, B], fill=COLORS[ni % len(COLORS)])
        d.text((L + slot * gi + 4, B + 8), g, fill="black", font=font)
    for ni, n in enumerate(names):
        d.rectangle([R + 12, T + 8 + 18 * ni, R + 26, T + 20 + 18 * ni], fill=COLORS[ni % len(COLORS)])
        d.text((R + 32, T + 6 + 18 * ni), n, fill="black", font=font)
    img.save(path)
    return path
