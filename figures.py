"""
The project's own figure pieces on matplotlib: the class colour palette (a class named by a colour
word is drawn in that colour, so a legend never shows the query "blue" as a yellow swatch), label
maps in it, and titled tiles beside a legend of the classes, which demo.py's results.png and
evaluate.py's --save-predictions panels are made of.

Run (draws a small self-check figure):
    python figures.py --out out/figures_check.png
"""
import argparse
import os

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

WHITE = (255, 255, 255)  # ignored pixels
# Distinguishable label colours (class 0 first: black is kept for background where a map has one)
BASE_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]
COLOUR_WORDS = {"red": (215, 35, 35), "green": (40, 170, 60), "blue": (40, 70, 215),
                "yellow": (235, 205, 30), "orange": (245, 130, 48), "purple": (145, 30, 180),
                "pink": (250, 150, 200), "brown": (140, 90, 40), "white": (245, 245, 245),
                "grey": (128, 128, 128), "gray": (128, 128, 128)}


def label_colours(n, background=False):
    """(n, 3) uint8: the fixed colours, then seeded random ones; class 0 black if background."""
    g = torch.Generator().manual_seed(3)
    extra = torch.randint(40, 256, (max(n, 1), 3), generator=g, dtype=torch.uint8)
    colours = torch.tensor(BASE_COLOURS, dtype=torch.uint8)
    offset = 1 if background else 0
    return torch.cat([torch.zeros(offset, 3, dtype=torch.uint8), colours, extra])[:n].clone()


def colours_for(names, background=False):
    """label_colours(), except that a class named by a colour word ("red", ...) gets that colour."""
    colours = label_colours(len(names) + 8 * len(names), background)  # spares for the words' own
    words = [n.strip().lower() for n in names]
    taken = {COLOUR_WORDS[w] for w in words if w in COLOUR_WORDS}
    def far(c):  # a spare colour must not be mistaken for a colour word's
        return all(sum((a - b) ** 2 for a, b in zip(c, t)) > 90 ** 2 for t in taken)
    spare = iter(c for c in colours[1 if background else 0:].tolist() if far(c))
    out = []
    for i, w in enumerate(words):
        if background and i == 0:
            out.append(colours[0].tolist())
        elif w in COLOUR_WORDS:
            out.append(list(COLOUR_WORDS[w]))
        else:
            out.append(next(spare))
    return torch.tensor(out, dtype=torch.uint8).view(-1, 3)


def label_map(labels, colours, ignore=None):
    """(H, W) int tensor of class ids -> PIL image in the (C, 3) colours; `ignore` pixels white."""
    lab = labels.long().cpu()
    out = colours[lab.clamp(0, len(colours) - 1)]
    if ignore is not None:
        out[lab == ignore] = torch.tensor(WHITE, dtype=torch.uint8)
    return Image.fromarray(out.numpy())


def figure(**kw):
    """A matplotlib Figure outside pyplot (no display, no global list of open figures); constrained
    layout keeps titles, tiles and legends from overlapping."""
    return Figure(layout="constrained", **kw)


def draw_tiles(fig, rows, colours, ignore=None):
    """Fill fig (a Figure or SubFigure) with rows of titled tiles: [[(tile, title or None), ...]].
    A tile is a photo (PIL) or a label map ((H, W) class ids) drawn in the (C, 3) colours pixel for
    pixel, so that it shows exactly the legend's colours (`ignore` pixels white)."""
    axes = fig.subplots(len(rows), max(len(r) for r in rows), squeeze=False)
    for ax_row, tiles in zip(axes, rows):
        for ax, (tile, title) in zip(ax_row, tiles):
            if isinstance(tile, torch.Tensor):
                ax.imshow(label_map(tile, colours, ignore), interpolation="nearest")
            else:
                ax.imshow(tile)
            ax.set_title(title or "")
        for ax in ax_row:
            ax.set_axis_off()
    return axes


def class_legend(fig, entries):
    """[(name, (r, g, b)), ...]: each class name beside its colour swatch, right of fig's tiles, in
    as many columns as the figure's height needs."""
    handles = [Patch(facecolor=np.asarray(c) / 255, edgecolor="black", label=n) for n, c in entries]
    per_column = max(1, int(fig.bbox.height * 72 / fig.dpi / 20) - 1)  # an entry: about 20 points
    columns = -(-len(handles) // per_column)
    return fig.legend(handles=handles, loc="outside right upper", ncols=columns)


def main():
    parser = argparse.ArgumentParser(description="Draw a self-check figure: photo, labels, legend")
    parser.add_argument("--out", default="out/figures_check.png", help="PNG to write")
    args = parser.parse_args()
    names = ["background", "red", "blue", "circle"]
    colours = colours_for(names, background=True)
    y, x = torch.meshgrid(torch.arange(96), torch.arange(128), indexing="ij")
    labels = (x // 32).clamp(max=3) * (y > 16)
    gradient = Image.linear_gradient("L").resize((128, 96)).convert("RGB")
    photo = Image.blend(label_map(labels, colours), gradient, 0.3)
    fig = figure(figsize=(7, 2.6))
    draw_tiles(fig, [[(photo, "photo"), (labels, "labels: 'red' in red")]], colours)
    class_legend(fig, zip(names, colours.tolist()))
    fig.suptitle("figures.py self-check")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
