"""What several processes (accelerate launch / torchrun) share: which device kind they run on."""
import os
import warnings

import torch

RANK_VARIABLES = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def cpu_only() -> bool:
    """Whether to run on the CPU: no GPU here, or `accelerate launch --cpu` asked for it. accelerate only forms
    a multi-process CPU group (gloo) when told cpu=True, so batch generation and training pass this on.
    Several CPU processes are started with `accelerate launch --multi_gpu --num_processes N` on a machine with
    no GPU, or with `torchrun --nproc_per_node N`; `accelerate launch --cpu --num_processes N` starts only one
    (without an MPI hostfile), which this warns about."""
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and "MASTER_ADDR" in os.environ and not any(name in os.environ for name in RANK_VARIABLES):
        warnings.warn("accelerate launch --cpu started a single process: for several CPU processes use "
                      "`accelerate launch --multi_gpu --num_processes N` (on a machine without a GPU) or "
                      "`torchrun --nproc_per_node N`.", stacklevel=2)
    return cpu or not torch.cuda.is_available()


def finish(state):
    """Wait for every process, then take the process group down, before any process exits: a process leaving
    with the group still up can abort at exit ("terminate called without an active exception"), and the
    launcher then stops the others mid-work."""
    if state.num_processes > 1:
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()
