"""python -m sd_core.training: train and evaluate the embedded models (see sd_core.training.recipes)."""
from sd_core.training.recipes import main

if __name__ == "__main__":
    raise SystemExit(main())
