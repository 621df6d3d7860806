"""Everything that runs sd_core beside diffusers: stage-by-stage parity, first divergence, speed and memory."""
import logging


class WithoutTorchvisionFallbackNotice(logging.Filter):
    """diffusers' pipeline modules ask transformers for the CLIP and SigLIP image processors; without torchvision
    (which sd_core never installs: requirements.txt) transformers falls back to their PIL versions, the ones wanted
    here, and says so on every run. Only that notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(WithoutTorchvisionFallbackNotice())
