"""The loop every training run shares: seeded batches, AdamW, EMA, resumable checkpoints, loss log, and
accelerate for several processes (DDP), mixed precision and gradient accumulation.

A step is one optimizer update on one *global* batch of `Run.batch` examples. `draw(step)` makes every
random number of that step for the whole global batch (after seeding torch with (seed, step)), so the
step's data never depends on how it is split. The batch is cut into processes x accumulation equal
contiguous parts; each process takes its own parts in turn, one forward/backward each, and DDP averages
the gradients at the last. Each part's loss is a mean over its rows, so the average over all parts is
the global batch's mean loss, and 2 processes x 2 micro-batches of B/4 make the update 1 process makes
with B (equal up to float summation order). One process with no accumulation makes exactly the update
the single-process loop made before accelerate, and keeps its checkpoint format: resuming from one is
exact. Only the main process keeps the EMA, logs and writes checkpoints.
"""
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from sd_core.files import atomic_path
from sd_core.training.distributed import cpu_only


@dataclasses.dataclass
class Run:
    """What every training run shares: seed, schedule, EMA, logging, checkpoints, parallelism."""
    out: Path
    steps: int
    batch: int  # the global batch of one optimizer step, whatever the number of processes
    lr: float
    seed: int = 0
    save_every: int = 250
    ema_decay: float = 0.999
    threads: int = 0
    stop_at: int | None = None  # stop (checkpointed) after this step, to resume later
    gradient_accumulation_steps: int = 1  # micro-batches per process per step (memory, not maths)
    mixed_precision: str | None = None  # "no", "bf16", "fp16"; None: accelerate launch's setting, else "no"


def learning_rate(run: Run, step: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return run.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, run.steps - warmup)
    return run.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: dict, model: torch.nn.Module, decay: float, frozen: set):
    for name, value in model.state_dict().items():
        if name not in frozen:  # an average of a constant is not bitwise that constant
            ema[name].mul_(decay).add_(value, alpha=1 - decay)


def save_checkpoint(path: Path, state: dict):
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def parts(batch: int, process: int, processes: int, accumulation: int) -> list[slice]:
    """The rows of the global batch this process trains on, one slice per micro-batch."""
    count = processes * accumulation
    if batch % count:
        raise ValueError(f"The batch ({batch}) must split evenly into {processes} process(es) x {accumulation} "
                         f"gradient accumulation step(s); choose a batch that is a multiple of {count}.")
    size = batch // count
    return [slice(i * size, (i + 1) * size) for i in range(process * accumulation, (process + 1) * accumulation)]


def take(batch: dict, rows: slice, device) -> dict:
    return {key: value[rows].to(device) if torch.is_tensor(value) else value[rows] for key, value in batch.items()}


class Loss(torch.nn.Module):
    """The trained models under one module whose forward is the loss of a part of a batch: DDP syncs the
    gradients of what a forward call used, whichever of the models' methods (encode, decode) the loss calls."""

    def __init__(self, models: dict, loss_fn: Callable[[dict], torch.Tensor]):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)
        self.loss_fn = loss_fn

    def forward(self, part: dict) -> torch.Tensor:
        return self.loss_fn(part)


def resume(checkpoint: Path, models: dict, optimizer) -> tuple[int, dict, dict | None]:
    """Load the weights and optimizer state of a checkpoint; returns (step, EMA state dicts, loss-scaler state)."""
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    for name, model in models.items():
        model.load_state_dict(state["models"][name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["ema"], state.get("scaler")


class StoppedAsAsked(SystemExit):
    """--stop-at was reached and the run checkpointed: exit status 0 (the stop is what was asked for), with the
    message that says how to resume."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message

    def __str__(self):
        return self.message


def train(run: Run, models: dict, draw: Callable[[int], dict], loss_fn: Callable[[dict], torch.Tensor],
          describe: str, helpers: tuple = ()) -> dict | None:
    """AdamW on every model in `models`. draw(step) -> the step's global batch (a dict of tensors and lists,
    first dimension the batch); loss_fn(part) -> the mean loss over a slice of it. `helpers`: untrained
    modules the loss uses (moved to the device). Returns the EMA state dicts on the main process, else None."""
    from accelerate import Accelerator

    if run.threads:
        torch.set_num_threads(run.threads)
    accelerator = Accelerator(cpu=cpu_only(), mixed_precision=run.mixed_precision,
                              gradient_accumulation_steps=run.gradient_accumulation_steps)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("fp16 mixed precision needs a GPU (on a CPU accelerate does not autocast to fp16); "
                         "use --mixed-precision bf16 on a CPU.")
    main = accelerator.is_main_process
    my_parts = parts(run.batch, accelerator.process_index, accelerator.num_processes, run.gradient_accumulation_steps)
    parameters = [p for model in models.values() for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=run.lr, weight_decay=0.0)
    checkpoint = run.out / "checkpoint.pt"
    start, ema, scaler_state = resume(checkpoint, models, optimizer) if checkpoint.is_file() else (0, None, None)
    if start and main:
        print(f"resumed {describe} at step {start}")
    module, optimizer = accelerator.prepare(Loss(models, loss_fn), optimizer)
    if scaler_state is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    for helper in helpers:
        helper.to(accelerator.device)
    ema = main_process_ema(models, ema, accelerator.device) if main else None  # the EMA lives on the main process
    frozen = {name: {key for key, p in model.named_parameters() if not p.requires_grad}  # kept out of the EMA
              for name, model in models.items()}
    end = min(run.steps, run.stop_at or run.steps)
    log = open_log(run, start) if main else None
    bar = tqdm(range(start, end), initial=start, total=run.steps, desc=describe, unit="step", disable=not main)
    started = time.time()
    for step in bar:
        torch.manual_seed(run.seed * 7919 + step)  # noise and dropout: a function of (seed, step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(run, step)
        loss = train_step(accelerator, module, optimizer, parameters, draw(step), my_parts)
        if not main:
            continue
        decay = min(run.ema_decay, (1 + step) / (10 + step))
        for name, model in models.items():
            update_ema(ema[name], model, decay, frozen[name])
        value = loss.item()  # one host sync a step
        log.write(f"{step} {value:.6f}\n")
        bar.set_postfix(loss=f"{value:.4f}")
        if (step + 1) % run.save_every == 0 or step + 1 == end:
            log.flush()
            save_state(checkpoint, models, optimizer, ema, step + 1, accelerator.scaler)
    accelerator.wait_for_everyone()  # the checkpoint is written before any process leaves
    if main:
        log.close()
    if end < run.steps:
        message = f"{describe}: stopped at step {end} of {run.steps}; run the same command again to resume."
        print(message, file=sys.stderr)
        raise StoppedAsAsked(message)
    if main:
        (run.out / "time.json").write_text(json.dumps({
            "steps": run.steps, "seconds_this_session": time.time() - started, "threads": torch.get_num_threads(),
            "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision}))
    return ema


def train_step(accelerator, module, optimizer, parameters: list, batch: dict, my_parts: list) -> torch.Tensor:
    """One optimiser step over this process's micro-batches of the global batch; returns the global batch's loss."""
    losses = []
    for rows in my_parts:
        with accelerator.accumulate(module):  # gradients sync (DDP) only after the last micro-batch
            loss = module(take(batch, rows, accelerator.device))
            accelerator.backward(loss)  # divided by the accumulation steps
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(parameters, 1.0)
            optimizer.step()  # a no-op until the gradients are synced
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return accelerator.reduce(torch.stack(losses).mean(), "mean")


def main_process_ema(models: dict, resumed: dict | None, device) -> dict:
    """The EMA weights: resumed from the checkpoint (on the device), or a copy of the models' starting weights."""
    if resumed is not None:
        return {name: {k: v.to(device) for k, v in values.items()} for name, values in resumed.items()}
    return {name: {k: v.detach().clone() for k, v in model.state_dict().items()} for name, model in models.items()}


def open_log(run: Run, start: int):
    """loss.log, open for appending, without the lines an interrupted run logged after its checkpoint."""
    run.out.mkdir(parents=True, exist_ok=True)
    log_path = run.out / "loss.log"
    if log_path.is_file():
        kept = [line for line in log_path.read_text().splitlines() if int(line.split()[0]) < start]
        log_path.write_text("".join(line + "\n" for line in kept))
    return log_path.open("a")


def save_state(checkpoint: Path, models: dict, optimizer, ema: dict, step: int, scaler):
    state = {"models": {n: m.state_dict() for n, m in models.items()}, "optimizer": optimizer.state_dict(),
             "ema": ema, "step": step}
    if scaler is not None:  # fp16's loss scale, so a resumed fp16 run is exact too
        state["scaler"] = scaler.state_dict()
    save_checkpoint(checkpoint, state)
