"""
Figures a person can read, drawn with PIL only (no plotting dependency): labelled panels, legends, a colour bar,
line plots and grids. Used by tagalign.py (one figure per image: photo | overlay + legend | one heatmap per
query on a fixed 0-1 scale), evaluate.py (photo | truth | prediction panels) and demo.py (results.png,
training.png).

Run (draws a small self-check figure):
    python figures.py --out out/figures_check.png
"""
import argparse
import math

import torch
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (120, 120, 120)
# Distinguishable label colours (class 0 first: black is kept for background/ignore where a map has one)
BASE_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
                (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
                (0, 0, 128), (128, 128, 128)]


def font(size=14):
    """Pillow's built-in scalable font (no font files needed)."""
    return ImageFont.load_default(size=size)


def label_colours(n, background=False):
    """(n, 3) uint8: the fixed colours first, then seeded random ones; class 0 black when background=True."""
    g = torch.Generator().manual_seed(3)
    extra = torch.randint(40, 256, (max(n, 1), 3), generator=g, dtype=torch.uint8)
    colours = torch.tensor(BASE_COLOURS, dtype=torch.uint8)
    offset = 1 if background else 0
    out = torch.cat([torch.zeros(offset, 3, dtype=torch.uint8), colours, extra])[:n].clone()
    return out


COLOUR_WORDS = {"red": (215, 35, 35), "green": (40, 170, 60), "blue": (40, 70, 215), "yellow": (235, 205, 30),
                "orange": (245, 130, 48), "purple": (145, 30, 180), "pink": (250, 150, 200), "brown": (140, 90, 40),
                "white": (245, 245, 245), "grey": (128, 128, 128), "gray": (128, 128, 128)}


def colours_for(names, background=False):
    """label_colours(), except that a class named by a colour word ("red", "blue", ...) is drawn in that colour,
    so a legend never shows the query "blue" as a yellow swatch."""
    colours = label_colours(len(names) + 8 * len(names), background)  # spares to skip the colour words' own
    taken = {COLOUR_WORDS[n.strip().lower()] for n in names if n.strip().lower() in COLOUR_WORDS}
    def far(c):  # a spare colour must not be mistaken for a colour word's
        return all(sum((a - b) ** 2 for a, b in zip(c, t)) > 90 ** 2 for t in taken)
    spare = iter(c for c in colours[1 if background else 0:].tolist() if far(c))
    out = []
    for i, n in enumerate(names):
        if background and i == 0:
            out.append(colours[0].tolist())
        elif n.strip().lower() in COLOUR_WORDS:
            out.append(list(COLOUR_WORDS[n.strip().lower()]))
        else:
            out.append(next(spare))
    return torch.tensor(out, dtype=torch.uint8).view(-1, 3)


def colormap(x):
    """Values in [0, 1], (H, W) tensor -> (H, W, 3) uint8, a blue-cyan-yellow-red ramp (jet-like); values outside
    [0, 1] are clipped, so a fixed scale stays fixed."""
    x = x.clamp(0, 1)
    r = (1.5 - (4 * x - 3).abs()).clamp(0, 1)
    g = (1.5 - (4 * x - 2).abs()).clamp(0, 1)
    b = (1.5 - (4 * x - 1).abs()).clamp(0, 1)
    return (torch.stack([r, g, b], -1) * 255).byte()


def to_image(x):
    """(H, W, 3) uint8 tensor or PIL image -> PIL RGB image."""
    return x.convert("RGB") if isinstance(x, Image.Image) else Image.fromarray(x.cpu().numpy())


def upscale(img, min_side=256, nearest=False):
    """Enlarge a small image for display so its short side is at least min_side (nearest for label maps, so
    labels stay crisp; bilinear for photos). Larger images are returned as they are."""
    w, h = img.size
    if min(w, h) >= min_side:
        return img
    s = min_side / min(w, h)
    return img.resize((round(w * s), round(h * s)), Image.NEAREST if nearest else Image.BILINEAR)


def fit(img, max_side=448, nearest=False):
    """Shrink a large image so its long side is at most max_side."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    s = max_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.NEAREST if nearest else Image.BILINEAR)


def text_size(text, f):
    box = f.getbbox(text)
    return box[2] - box[0], box[3] - box[1]


def wrap(text, f, width):
    """Greedy word wrap to a pixel width."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and text_size(trial, f)[0] > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def titled(img, title, size=14, below=True):
    """The image with its title written under (or over) it, wrapped to the image's width."""
    f = font(size)
    lines = wrap(title, f, img.width - 4) or [""]
    line_h = size + 4
    out = Image.new("RGB", (img.width, img.height + line_h * len(lines) + 4), WHITE)
    y_img = 0 if below else line_h * len(lines) + 4
    out.paste(img, (0, y_img))
    draw = ImageDraw.Draw(out)
    y = img.height + 2 if below else 2
    for line in lines:
        w, _ = text_size(line, f)
        draw.text(((img.width - w) // 2, y), line, fill=BLACK, font=f)
        y += line_h
    return out


def legend(entries, size=14, columns=1, swatch=14):
    """[(name, (r, g, b)), ...] -> an image with one colour swatch and name per entry."""
    f = font(size)
    entries = list(entries)
    rows = math.ceil(len(entries) / columns) if entries else 1
    col_w = max([text_size(n, f)[0] for n, _ in entries] + [10]) + swatch + 16
    row_h = max(size, swatch) + 6
    out = Image.new("RGB", (columns * col_w + 8, rows * row_h + 8), WHITE)
    draw = ImageDraw.Draw(out)
    for i, (name, colour) in enumerate(entries):
        x, y = 4 + (i // rows) * col_w, 4 + (i % rows) * row_h
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(int(c) for c in colour), outline=BLACK)
        draw.text((x + swatch + 6, y + 1), name, fill=BLACK, font=f)
    return out


def colour_bar(height, label="share", size=12, ticks=(0.0, 0.25, 0.5, 0.75, 1.0), lo=0.0, hi=1.0):
    """A vertical bar of colormap() from lo (bottom) to hi (top) with tick labels: the key to every heatmap."""
    f = font(size)
    bar_w, pad = 16, 6
    labels = [f"{lo + t * (hi - lo):g}" for t in ticks]
    text_w = max(text_size(s, f)[0] for s in labels)
    title_h = size + 8
    out = Image.new("RGB", (bar_w + text_w + 3 * pad, height + title_h + size), WHITE)
    values = torch.linspace(1, 0, height).view(height, 1).expand(height, bar_w)
    out.paste(Image.fromarray(colormap(values).numpy()), (pad, title_h))
    draw = ImageDraw.Draw(out)
    draw.rectangle([pad, title_h, pad + bar_w - 1, title_h + height - 1], outline=BLACK)
    draw.text((pad, 2), label, fill=BLACK, font=f)
    for t, s in zip(ticks, labels):
        y = title_h + round((1 - t) * (height - 1))
        draw.line([pad + bar_w, y, pad + bar_w + 3, y], fill=BLACK)
        draw.text((pad + bar_w + pad, y - size // 2), s, fill=BLACK, font=f)
    return out


def row(images, gap=8, align="top"):
    """Paste images left to right on white."""
    h = max(i.height for i in images)
    out = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), h), WHITE)
    x = 0
    for i in images:
        out.paste(i, (x, 0 if align == "top" else (h - i.height) // 2))
        x += i.width + gap
    return out


def column(images, gap=8):
    """Paste images top to bottom on white, left-aligned."""
    w = max(i.width for i in images)
    out = Image.new("RGB", (w, sum(i.height for i in images) + gap * (len(images) - 1)), WHITE)
    y = 0
    for i in images:
        out.paste(i, (0, y))
        y += i.height + gap
    return out


def grid(images, columns, gap=8):
    """Images in rows of `columns`."""
    rows = [row(images[i:i + columns], gap) for i in range(0, len(images), columns)]
    return column(rows, gap)


def label_map(labels, colours, ignore=None):
    """(H, W) int tensor of class ids -> PIL image in the given (C, 3) colours; `ignore` pixels white."""
    lab = labels.long().cpu()
    out = colours[lab.clamp(0, len(colours) - 1)]
    if ignore is not None:
        out[lab == ignore] = torch.tensor(WHITE, dtype=torch.uint8)
    return Image.fromarray(out.numpy())


def blend(photo, overlay, alpha=0.5):
    """Blend two same-size PIL images (the photo under a label map or heatmap)."""
    return Image.blend(photo.convert("RGB"), overlay.convert("RGB").resize(photo.size, Image.NEAREST), alpha)


def line_plot(series, title="", xlabel="step", ylabel="", size=(560, 320), font_size=13):
    """{name: [(x, y), ...]} -> a PIL line plot with axes, ticks and a legend (each series its own colour)."""
    f = font(font_size)
    W, H = size
    left, right, top, bottom = 58, 16, 30, 44
    out = Image.new("RGB", (W, H), WHITE)
    draw = ImageDraw.Draw(out)
    points = [p for s in series.values() for p in s if p[1] is not None and math.isfinite(p[1])]
    if not points:
        draw.text((left, H // 2), "no data", fill=BLACK, font=f)
        return out
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), top + (y1 - y) / (y1 - y0) * (H - top - bottom))
    draw.rectangle([left, top, W - right, H - bottom], outline=BLACK)
    for k in range(5):  # ticks
        yv = y0 + k / 4 * (y1 - y0)
        _, yy = px(x0, yv)
        draw.line([left - 4, yy, left, yy], fill=BLACK)
        label = f"{yv:.3g}"
        draw.text((left - 6 - text_size(label, f)[0], yy - font_size // 2), label, fill=BLACK, font=f)
        xv = x0 + k / 4 * (x1 - x0)
        xx, _ = px(xv, y0)
        draw.line([xx, H - bottom, xx, H - bottom + 4], fill=BLACK)
        label = f"{xv:.0f}"
        draw.text((xx - text_size(label, f)[0] / 2, H - bottom + 6), label, fill=BLACK, font=f)
    colours = label_colours(len(series))
    for (name, s), colour in zip(series.items(), colours.tolist()):
        pts = [px(x, y) for x, y in s if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=tuple(colour), width=2)
        for p in pts[-1:] if len(pts) > 1 else pts:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=tuple(colour))
    draw.text(((W - text_size(title, f)[0]) / 2, 6), title, fill=BLACK, font=f)
    draw.text(((W - text_size(xlabel, f)[0]) / 2, H - 20), xlabel, fill=BLACK, font=f)
    if ylabel:
        draw.text((4, 6), ylabel, fill=BLACK, font=f)
    key = legend([(n, tuple(c)) for n, c in zip(series, colours.tolist())], size=font_size - 1)
    out.paste(key, (W - right - key.width - 4, top + 4))
    return out


def main():
    parser = argparse.ArgumentParser(description="Draw a self-check figure with every element of this module")
    parser.add_argument("--out", default="out/figures_check.png", help="PNG to write")
    args = parser.parse_args()
    import os
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 96), indexing="ij")
    heat = to_image(colormap(x))
    labels = (x * 3).long().clamp(max=2)
    colours = label_colours(3)
    panels = [titled(upscale(heat, 128), "x from 0 (left) to 1 (right)"),
              titled(upscale(label_map(labels, colours), 128, nearest=True), "three classes")]
    plot = line_plot({"a": [(i, math.sin(i / 5)) for i in range(50)], "b": [(i, i / 50) for i in range(50)]},
                     title="two series")
    fig = column([row(panels + [colour_bar(128), legend([("zero", colours[0]), ("one", colours[1]),
                                                          ("two", colours[2])])]), plot])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
