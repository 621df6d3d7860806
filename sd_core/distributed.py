"""What several processes (accelerate launch / torchrun) share: which device kind they run on."""
import os

import torch


def cpu_only() -> bool:
    """Whether to run on the CPU: no GPU here, or `accelerate launch --cpu` asked for it. accelerate only forms
    a multi-process CPU group (gloo) when told cpu=True, so batch generation and training pass this on;
    several CPU processes are started with `accelerate launch --multi_gpu --num_processes N` on a machine with
    no GPU (`--cpu` alone starts one process) or with `torchrun --nproc_per_node N`."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
