"""Regenerate docs/compare/: every comparison kind once on the embedded models (strip + plots, no text files).

    python -m compare.gallery [docs/compare]
"""
import sys
from pathlib import Path

from sd_core.checkpoints.catalog import EMBEDDED_DIT

from .kinds import run_comparison

RUNS = [  # (folder, kind, model (None: the kind's default embedded model), settings)
    ("text_to_image", "text_to_image", None, {}),
    ("image_to_image", "image_to_image", None, {}),
    ("vae", "vae", None, {}),
    ("dit", "dit", None, {"class_labels": ["red circle"]}),
    ("dit-first3", "dit", None, {"class_labels": ["red circle"], "guided_channels": "first3"}),
    ("dit_timestep_semantics", "dit_timestep_semantics", None, {"class_labels": ["red circle"]}),
    ("precision", "precision", None, {"device": "cpu"}),
    ("precision-dit", "precision", EMBEDDED_DIT, {"device": "cpu", "class_labels": ["red circle"]}),
    ("attention", "attention", None, {"device": "cpu"}),
    ("fast_path", "fast_path", None, {"deepcache": 2}),
    ("fast_path-tome", "fast_path", None, {"deepcache": 0, "tome": 0.5}),
]


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or ["docs/compare"])[0])
    for folder, kind, model, settings in RUNS:
        report = run_comparison(kind, model, **settings)
        report.write(out / folder, text=False)
        print(f"{folder}: {report.verdict}")
        for name, value in report.measurements.items():
            print(f"    {name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
