"""The parity grid: every cell of an X/Y/Z plot also run through diffusers on the same weights, by the very
comparison the Compare tab runs for those settings (compare.kinds.run_comparison, handed in by the caller:
sd_core never imports compare). Each cell shows the reference's picture, the largest 8-bit difference from
sd_core's and Compare's verdict: visual diffing over a whole grid of settings.

    result = parity_plot(plot, compare.kinds.run_comparison, pipe)
    result.grids[0]                                   # the reference's pictures, each captioned PASS/FAIL
    result.cells[k].passed, result.cells[k].verdict   # Compare's verdict for cell k's settings
"""
import dataclasses
from collections.abc import Callable

from sd_core.pipelines.lab.drawing import strip
from sd_core.pipelines.lab.xyz import Plot, cell_label, plot_grids
from sd_core.pipelines.settings import DiTSettings

# what Compare takes of each record; any other field away from its default is refused (Compare would not run it)
SD_COMPARED = ("prompt", "negative_prompt", "steps", "guidance_scale", "scheduler", "seed", "height", "width",
               "strength", "model")
DIT_COMPARED = ("class_labels", "steps", "guidance_scale", "scheduler", "seed", "guided_channels", "model")
BADGES = {True: ("✅", "PASS", (20, 130, 40)), False: ("❌", "FAIL", (200, 30, 30)),
          None: ("📏", "MEASURED", (60, 60, 60))}


@dataclasses.dataclass
class ParityCell:
    passed: bool | None  # Compare's verdict: True within the parity policy, None a measurement
    max_difference: float  # the two 8-bit pictures' largest difference, in levels
    verdict: str  # Compare's one line
    sd_core: object  # sd_core's picture in the comparison (PIL)
    reference: object  # diffusers' picture (PIL)

    def caption(self, emoji: bool = True) -> str:
        """"✅ max |difference| 0" (emoji for the app's captions), "PASS, max |difference| 0" where PIL draws it."""
        symbol, word, _ = BADGES[self.passed]
        return f"{symbol} max |difference| {self.max_difference:g}" if emoji else \
            f"{word}, max |difference| {self.max_difference:g}"


@dataclasses.dataclass
class ParityResult:
    grids: list  # one grid per Z value: the reference's pictures captioned with their verdicts
    cells: list  # ParityCell per cell, A1111's order

    @property
    def passed(self) -> bool:
        return all(cell.passed is not False for cell in self.cells)


def comparison(record, image=None) -> tuple[str, dict]:
    """(Compare's kind, its settings) for one cell's record: text or image to image, or DiT. A record that
    changes what Compare does not take (clip skip, LoRAs, the fast path, ...) is refused by name."""
    compared = DIT_COMPARED if isinstance(record, DiTSettings) else SD_COMPARED
    default = type(record)()
    changed = [f.name for f in dataclasses.fields(record)
               if f.name not in compared and getattr(record, f.name) != getattr(default, f.name)]
    if changed:
        raise ValueError(f"The parity grid runs Compare's comparisons, which do not take {', '.join(changed)}: "
                         f"leave those at their defaults (or turn the parity grid off).")
    settings = {name: getattr(record, name) for name in compared if name != "model"}
    if isinstance(record, DiTSettings):
        return "dit", dict(settings, class_labels=list(record.class_labels))
    if record.strength is None:
        settings.pop("strength")
        return "text_to_image", settings
    if image is None:
        raise ValueError("The Denoising axis compares image to image: give a starting image.")
    return "image_to_image", dict(settings, image=image)


def comparisons(plot: Plot, image=None) -> list[tuple[str, dict]]:
    """Every cell's comparison (kind, settings): call it before any picture is made, so that a plot Compare cannot
    check is refused at once."""
    return [comparison(record, image) for record in plot.cells]


def parity_cell(compare: Callable, pipe, kind: str, settings: dict) -> ParityCell:
    report = compare(kind, pipe, **settings)
    stage = next(s for s in report.stages if s.name.startswith("decoded images"))
    reference = report.images.get("diffusers", report.images.get("reference"))
    return ParityCell(report.passed, stage.max_abs, report.verdict, report.images["sd_core"], reference)


def parity_plot(plot: Plot, compare: Callable, pipe, models: dict | None = None, image=None,
                progress: Callable | None = None) -> ParityResult:
    """Every cell through `compare(kind, pipeline, **settings)` (compare.kinds.run_comparison) on the pipeline
    its model names in `models` (else `pipe`); progress(done, total, label) after each."""
    cells = []
    for index, (record, (kind, settings)) in enumerate(zip(plot.cells, comparisons(plot, image))):
        cells.append(parity_cell(compare, (models or {}).get(record.model, pipe), kind, settings))
        if progress is not None:
            progress(index + 1, len(plot.cells), f"parity: {cell_label(plot, index)}")
    shown = [strip([cell.reference], [cell.caption(emoji=False)], colours=[BADGES[cell.passed][2]])
             for cell in cells]
    return ParityResult(plot_grids(plot, shown), cells)
