"""sd_core's Gradio app: text to image, image to image, VAE round-trip, DiT sampling, and sd_core vs diffusers.

    python app.py                                  # the embedded models, offline, on this machine
    python app.py --models-dir ~/models --share    # also offer the checkpoints found under ~/models

Visitors pick models from a list: the embedded ones, folders and .safetensors files under the
configured model roots (--models-dir / SD_CORE_MODELS_DIR), and hub ids when --allow-hub is given.
The API takes the same choices the dropdowns offer (gradio refuses any other value; with --allow-hub, any hub id):
a path typed into it is refused, even one inside a model root. Where the hub is reachable
(a Hugging Face Space, where SPACE_ID is set, or --allow-hub) the curated hub models of sd_core.checkpoints.catalog are
offered too, fetched from the hub and never looked up on this disk. LoRAs and embeddings: see sd_core.app.parts.

On a Space the app starts unchanged: gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself, and on
ZeroGPU hardware the handlers run inside `spaces.GPU`.
"""
from compare import kinds as comparisons
from sd_core.app import launch, layout


def build():
    """The app's Blocks, with the Compare tab over compare/'s comparisons."""
    return layout.build(comparisons)


if __name__ == "__main__":
    launch.main(comparisons=comparisons)
