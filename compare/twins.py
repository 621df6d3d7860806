"""sd_core models sharing a diffusers model's tensors, for measuring both on the same weights."""
from sd_core.checkpoints.loading import on_meta


def twin(ours_class, reference, config=None):
    """An sd_core model sharing the reference's tensors (no copy)."""
    with on_meta():
        model = ours_class.from_config(config or dict(reference.config))
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()
