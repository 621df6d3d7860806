"""Small plots drawn with PIL (no matplotlib): a log-scale line plot and a log-scale bar chart.

    line_plot({"latents": [1e-7, 3e-7], "noise prediction": [2e-7, 2e-7]}, "relative error per step", threshold=1e-4)
    bar_chart(["conv_in", "down_blocks.0"], [1e-8, 0.3], "relative error per module", threshold=1e-4, marked=1)
"""
import math

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
FLOOR = 1e-12  # a zero error beside nonzero ones is drawn at the floor of the log axis
FONT = ImageFont.load_default(size=15)  # legible where the app's gallery shrinks a plot to its column
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 30, 40


def all_zero(values) -> bool:
    """Every error exactly 0: the two sides are identical, which a log axis cannot draw (it would sit on FLOOR)."""
    return bool(values) and all(value == 0 for value in values)


def identical_plot(title: str, width: int, height: int) -> Image.Image:
    """The plot of errors that are all exactly 0: the title and the word, no log axis."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 6), title, fill="black", font=FONT)
    draw.rectangle([LEFT, TOP, width - RIGHT, height - BOTTOM], outline="black")
    text = "identical: every error is exactly 0"
    draw.text(((width - draw.textlength(text, font=FONT)) / 2, height / 2 - 8), text, fill=(44, 120, 44), font=FONT)
    return image


def log_range(values, threshold=None) -> tuple[float, float]:
    finite = [max(v, FLOOR) for v in values if math.isfinite(v)] + ([threshold] if threshold else [])
    low, high = (min(finite), max(finite)) if finite else (FLOOR, 1.0)
    low, high = math.floor(math.log10(low)), math.ceil(math.log10(high))
    return low, max(high, low + 1)


def frame(title: str, width: int, height: int, low: int, high: int):
    """A white canvas with the title and a log10 y axis from 10^low to 10^high; returns (image, draw, y_of)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 6), title, fill="black", font=FONT)
    bottom = height - BOTTOM

    def y_of(value: float) -> float:
        value = max(value, FLOOR) if math.isfinite(value) else 10.0 ** high
        fraction = (math.log10(value) - low) / (high - low)
        return bottom - min(max(fraction, 0.0), 1.0) * (bottom - TOP)
    step = max(1, (high - low) // 6)
    for exponent in range(low, high + 1, step):
        y = y_of(10.0 ** exponent)
        draw.line([(LEFT, y), (width - RIGHT, y)], fill=(230, 230, 230))
        draw.text((4, y - 8), f"1e{exponent}", fill="black", font=FONT)
    draw.rectangle([LEFT, TOP, width - RIGHT, bottom], outline="black")
    return image, draw, y_of


def threshold_line(draw, y_of, threshold, width):
    if threshold:
        y = y_of(threshold)
        for x in range(LEFT, width - RIGHT, 8):
            draw.line([(x, y), (min(x + 4, width - RIGHT), y)], fill=(120, 120, 120))
        text = f"threshold {threshold:.0e}"
        draw.text((width - RIGHT - 4 - draw.textlength(text, font=FONT), y - 17), text, fill=(90, 90, 90), font=FONT)


def line_plot(series: dict, title: str, x_label: str = "step", threshold: float | None = None,
              width: int = 560, height: int = 300) -> Image.Image:
    """One line per named series of positive values (log y axis), x = 1..n; a dashed threshold line. All zero: the
    word "identical" instead."""
    if all_zero([v for values in series.values() for v in values]):
        return identical_plot(title, width, height)
    low, high = log_range([v for values in series.values() for v in values], threshold)
    image, draw, y_of = frame(title, width, height, low, high)
    n = max((len(values) for values in series.values()), default=1)
    span = width - LEFT - RIGHT

    def x_of(i):
        return LEFT + (span * i / (n - 1) if n > 1 else span / 2)
    threshold_line(draw, y_of, threshold, width)
    for i in range(n):
        if n <= 12 or i % math.ceil(n / 12) == 0 or i == n - 1:
            draw.text((x_of(i) - 4, height - BOTTOM + 3), str(i + 1), fill="black", font=FONT)
    draw.text((LEFT + span // 2 - 10, height - 19), x_label, fill="black", font=FONT)
    for k, (name, values) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [(x_of(i), y_of(v)) for i, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((LEFT + 6 + 170 * k, TOP + 4), f"- {name}", fill=colour, font=FONT)
    return image


def bar_chart(labels: list, values: list, title: str, threshold: float | None = None, marked: int | None = None,
              width: int = 720, height: int = 300) -> Image.Image:
    """One bar per value in the given order (log y axis); bar `marked` in red and named under the axis. All zero: the
    word "identical" instead."""
    if all_zero(values):
        return identical_plot(title, width, height)
    low, high = log_range(values, threshold)
    image, draw, y_of = frame(title, width, height, low, high)
    span, bottom = width - LEFT - RIGHT, height - BOTTOM
    bar = span / max(len(values), 1)
    for i, value in enumerate(values):
        over = threshold is not None and (not math.isfinite(value) or value > threshold)
        colour = (214, 39, 40) if i == marked else (240, 150, 150) if over else (31, 119, 180)
        x0 = LEFT + i * bar
        draw.rectangle([x0, y_of(value), max(x0, x0 + bar - (1 if bar > 3 else 0)), bottom], fill=colour)
    threshold_line(draw, y_of, threshold, width)
    draw.text((LEFT, height - BOTTOM + 3), f"{len(values)} modules in execution order", fill="black", font=FONT)
    if marked is not None and 0 <= marked < len(labels):
        x = LEFT + (marked + 0.5) * bar
        draw.polygon([(x, bottom + 2), (x - 4, bottom + 9), (x + 4, bottom + 9)], fill=(214, 39, 40))
        text = f"first over threshold: {labels[marked]}"
        length = draw.textlength(text, font=FONT)
        draw.text((min(max(LEFT, x - length / 2), width - RIGHT - length), height - 19), text, fill=(214, 39, 40),
                  font=FONT)
    return image


def caption_strip(images: dict, title: str, tile: int = 192) -> Image.Image:
    """The images side by side, each scaled (nearest) to `tile` pixels high, under their captions and a title."""
    resized = []
    for caption, image in images.items():
        scale = tile / image.height
        resized.append((caption, image.convert("RGB").resize((max(1, round(image.width * scale)), tile),
                                                             Image.NEAREST)))
    width = max(sum(image.width for _, image in resized) + 4 * (len(resized) + 1), 6 * len(title) + 8)
    canvas = Image.new("RGB", (width, tile + 40), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black")
    x = 4
    for caption, image in resized:
        draw.text((x, 20), caption[: max(4, image.width // 6)], fill="black")
        canvas.paste(image, (x, 36))
        x += image.width + 4
    return canvas
