"""What every comparison returns: stages, pictures, plots and a one-line verdict; `write` takes it home.

    report = run_comparison("vae", "sd_core/weights/shapes-sd")
    print(report.verdict)
    report.write("out/vae")        # report.json, report.md, images.png (the strip), plot-*.png
"""
import dataclasses
import json
import math
import re
from pathlib import Path

from sd_core.checkpoints import catalog

from .plots import bar_chart, caption_strip, line_plot

STEP_STAGE = re.compile(r"^step (\d+) (.+)$")


@dataclasses.dataclass
class Report:
    kind: str
    settings: dict
    stages: list  # parity.Stage, in pipeline order
    verdict: str  # one line
    passed: bool | None  # None: a measurement (precision drift, a deliberate deviation), not a parity claim
    images: dict = dataclasses.field(default_factory=dict)  # caption -> PIL image
    plots: dict = dataclasses.field(default_factory=dict)  # name -> PIL image
    divergence: dict = dataclasses.field(default_factory=dict)  # parity.first_divergence's result
    measurements: dict = dataclasses.field(default_factory=dict)  # headline numbers (drift, deviation size)
    notes: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if "model" in self.settings:  # a report travels (the app hands it to visitors): no machine's folders in it
            self.settings = {**self.settings, "model": model_label(self.settings["model"])}

    def to_dict(self) -> dict:
        divergence = {k: v for k, v in self.divergence.items() if k != "modules"}
        divergence["modules"] = [(m["name"], m["relative"]) for m in self.divergence.get("modules", [])]
        return {"kind": self.kind, "verdict": self.verdict, "passed": self.passed, "settings": self.settings,
                "measurements": self.measurements, "notes": self.notes,
                "stages": [dataclasses.asdict(s) for s in self.stages], "divergence": divergence,
                "images": list(self.images), "plots": list(self.plots)}

    def markdown(self) -> str:
        lines = [f"# {self.kind}", "", f"**{self.verdict}**", "",
                 "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), ""]
        if self.measurements:
            lines += ["| measurement | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in self.measurements.items()]
            lines.append("")
        lines += ["| stage | max abs | mean abs | relative | cosine distance | tolerance | within |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for s in self.stages:
            psnr = f" (PSNR {s.extra['psnr_db']:.2f} dB)" if "psnr_db" in s.extra else ""
            lines.append(f"| {s.name}{psnr} | {s.max_abs:.3g} | {s.mean_abs:.3g} | {s.relative:.3g} | "
                         f"{1 - s.cosine:.3g} | {s.tolerance:.3g} | {'yes' if s.passed else 'NO'} |")
        if self.divergence:
            first = self.divergence.get("first_divergent")
            lines += ["", f"Per-module check: {self.divergence.get('modules_compared', 0)} modules compared; first "
                      "over tolerance: " + (f"`{first['name']}` (relative {first['relative']:.3g})" if first
                                            else "none")]
        lines += [""] + [f"- {note}" for note in self.notes]
        lines += ["", "![images](images.png)"] + [f"![{name}](plot-{name}.png)" for name in self.plots]
        return "\n".join(lines) + "\n"

    def gallery(self) -> list:
        """[(image, caption)] for a gr.Gallery: the images, then the plots."""
        return [(image, caption) for caption, image in {**self.images, **self.plots}.items()]

    def strip(self):
        return caption_strip(self.images, self.verdict)

    def write(self, folder, text: bool = True) -> Path:
        """report.json + report.md (unless text=False), images.png (the strip) and plot-<name>.png."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} is a file; give a folder for the report.")
        folder.mkdir(parents=True, exist_ok=True)
        if text:
            (folder / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=json_value))
            (folder / "report.md").write_text(self.markdown())
        self.strip().save(folder / "images.png", optimize=True)
        for name, plot in self.plots.items():
            plot.save(folder / f"plot-{name}.png", optimize=True)
        return folder


def model_label(source) -> str:
    """A model as a report names it: the catalog's name (the embedded models, the curated hub ones), a hub id as it
    is, a folder or file by its own name, never by the absolute path it has on the machine that ran it."""
    entry = catalog.entry_for(source)
    if entry is not None:
        return entry.name
    path = Path(str(source))
    return path.name if path.is_absolute() else str(source)


def json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return float(value) if hasattr(value, "__float__") else str(value)


def per_step_series(stages: list) -> dict:
    """{"noise prediction": [relative error of step 1, 2, ...], "latents": [...]} from stages named 'step N what'."""
    series = {}
    for stage in stages:
        match = STEP_STAGE.match(stage.name)
        if match:
            series.setdefault(match.group(2), []).append(stage.relative)
    return series


def standard_plots(stages: list, divergence: dict, what: str, threshold: float) -> dict:
    """The per-step line plot (where the run has steps) and the per-module bar chart (where modules were compared)."""
    plots = {}
    series = per_step_series(stages)
    if series:
        plots["per-step"] = line_plot(series, "relative error per step (max |a-b| / max |b|)", threshold=threshold)
    modules = divergence.get("modules", [])
    if modules:
        first = next((i for i, m in enumerate(modules) if not m["passed"]), None)
        plots["per-module"] = bar_chart([m["name"] for m in modules], [m["relative"] for m in modules],
                                        f"relative error per module of the {what}", threshold=divergence["tolerance"],
                                        marked=first)
    return plots
