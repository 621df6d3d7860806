"""PIL drawing the Lab's experiments share: labelled grids, captioned strips, heat-map overlays, line plots.

Cells are enlarged with nearest-neighbour (the embedded models draw 64 px) so that the labels, drawn in a
scalable font, stay legible beside them."""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
GAP = 4
MIN_CELL = 160  # cells smaller than this are enlarged (nearest) so a label never dwarfs its picture


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def enlarged(image: Image.Image, side: int = MIN_CELL) -> Image.Image:
    """`image` scaled up by a whole factor (nearest) until its shorter side reaches `side`; never scaled down."""
    factor = max(1, math.ceil(side / min(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def wrapped(draw: ImageDraw.ImageDraw, text: str, width: int, typeface) -> list[str]:
    """`text` broken into lines that fit `width` pixels (a word longer than the width keeps its own line)."""
    lines, line = [], ""
    for word in str(text).split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=typeface) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines or [""]


def labelled_grid(images: list, columns: int, column_labels: list[str], row_labels: list[str],
                  title: str = "", size: int = 18) -> Image.Image:
    """Images laid out row by row, `columns` per row, the column labels above, the row labels on the left and
    the title on top: A1111's grid legend."""
    cells = [enlarged(image.convert("RGB")) for image in images]
    cell_w, cell_h = max(c.width for c in cells) + GAP, max(c.height for c in cells) + GAP  # a white gap between
    rows = math.ceil(len(cells) / columns)
    typeface, measure = font(size), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = size + 6
    left = 0 if not any(row_labels) else min(260, 12 + max(measure.textlength(label, font=typeface)
                                                          for label in row_labels))
    header_lines = max((len(wrapped(measure, label, cell_w - 8, typeface)) for label in column_labels), default=0)
    title_lines = wrapped(measure, title, left + columns * cell_w - 8, typeface) if title else []
    top = line_h * (len(title_lines) + header_lines) + (8 if header_lines or title_lines else 0)
    grid = Image.new("RGB", (int(left) + columns * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((6, 4 + i * line_h), line, fill="black", font=typeface)
    for column, label in enumerate(column_labels):
        for i, line in enumerate(wrapped(draw, label, cell_w - 8, typeface)):
            x = left + column * cell_w + (cell_w - draw.textlength(line, font=typeface)) / 2
            draw.text((x, 4 + line_h * (len(title_lines) + i)), line, fill="black", font=typeface)
    for row, label in enumerate(row_labels):
        lines = wrapped(draw, label, int(left) - 8, typeface)
        y = top + row * cell_h + (cell_h - line_h * len(lines)) / 2
        for i, line in enumerate(lines):
            draw.text((4, y + i * line_h), line, fill="black", font=typeface)
    for index, cell in enumerate(cells):
        grid.paste(cell, (int(left) + (index % columns) * cell_w, top + (index // columns) * cell_h))
    return grid


def strip(images: list, captions: list[str], size: int = 16, colours: list | None = None) -> Image.Image:
    """Images side by side, each captioned underneath (in black, or in its colour of `colours`)."""
    cells = [enlarged(image.convert("RGB")) for image in images]
    cell_w, cell_h = max(c.width for c in cells), max(c.height for c in cells)
    typeface, line_h = font(size), size + 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = max(len(wrapped(measure, caption, cell_w - 6, typeface)) for caption in captions)
    row = Image.new("RGB", (cell_w * len(cells), cell_h + line_h * lines + 6), "white")
    draw = ImageDraw.Draw(row)
    for i, (cell, caption) in enumerate(zip(cells, captions)):
        row.paste(cell, (i * cell_w, 0))
        for k, line in enumerate(wrapped(draw, caption, cell_w - 6, typeface)):
            x = i * cell_w + (cell_w - draw.textlength(line, font=typeface)) / 2
            draw.text((x, cell_h + 3 + k * line_h), line, fill=colours[i] if colours else "black", font=typeface)
    return row


def heat_overlay(image: Image.Image, heat: np.ndarray, opacity: float = 0.6) -> Image.Image:
    """`heat` (values in [0, 1], any shape, resized bilinearly to the image) drawn over `image` from dark blue
    through red to yellow, `opacity` at the hottest."""
    heat = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize(image.size, Image.BILINEAR))
    heat = np.clip(heat, 0, 1)[..., None]
    colour = np.concatenate([np.clip(3 * heat, 0, 1), np.clip(3 * heat - 1, 0, 1), np.clip(1 - 3 * heat, 0, 1) * 0.6],
                            axis=-1) * 255
    base = np.asarray(image.convert("RGB"), np.float32)
    alpha = opacity * (0.25 + 0.75 * heat)
    return Image.fromarray((base * (1 - alpha) + colour * alpha).round().astype(np.uint8))


def line_plot(series: dict, title: str, x_label: str, y_label: str, width: int = 720, height: int = 400,
              size: int = 15) -> Image.Image:
    """One line per named series of finite values on a linear y axis (x = step 0..n-1), with a legend: the
    schedules plot, where log-SNR runs negative (a log axis cannot show it)."""
    values = [v for points in series.values() for v in points if math.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    low, high = (low - 0.5, high + 0.5) if high - low < 1e-9 else (low, high)
    left, right, top, bottom = 70, 16, 36 + (size + 4) * math.ceil(len(series) / 3), 48
    image = Image.new("RGB", (width, height), "white")
    draw, typeface = ImageDraw.Draw(image), font(size)
    draw.text((left, 6), title, fill="black", font=typeface)
    n = max((len(points) for points in series.values()), default=1)
    x_of = lambda i: left + (width - left - right) * (i / (n - 1) if n > 1 else 0.5)
    y_of = lambda v: height - bottom - (v - low) / (high - low) * (height - top - bottom)
    for k in range(6):
        value = low + (high - low) * k / 5
        draw.line([(left, y_of(value)), (width - right, y_of(value))], fill=(230, 230, 230))
        draw.text((4, y_of(value) - size / 2), f"{value:.3g}", fill="black", font=typeface)
    for i in range(n):
        if n <= 12 or i % math.ceil(n / 12) == 0 or i == n - 1:
            draw.text((x_of(i) - 4, height - bottom + 4), str(i), fill="black", font=typeface)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left + (width - left - right) / 2 - 20, height - size - 6), x_label, fill="black", font=typeface)
    draw.text((4, top - size - 4), y_label, fill="black", font=typeface)
    for k, (name, points) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        xy = [(x_of(i), y_of(v)) for i, v in enumerate(points) if math.isfinite(v)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        x, y = left + 6 + (width - left) // 3 * (k % 3), 30 + (size + 4) * (k // 3)
        draw.line([(x, y + size / 2), (x + 18, y + size / 2)], fill=colour, width=3)
        draw.text((x + 24, y), name, fill=colour, font=typeface)
    return image
