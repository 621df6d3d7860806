"""Run a module on N local CPU processes the way users do: `accelerate launch --multi_gpu` (torchrun, gloo on
loopback; on a machine without a GPU, sd_core.training.distributed.cpu_only() turns that into a CPU process group)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])


def free_port() -> int:
    with socket.socket() as s:  # other test runs share this machine: never assume 29500 is free
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, args: list[str], timeout: int = 120, returncode: int = 0) -> subprocess.CompletedProcess:
    """`python -m ...args` on one process, or under accelerate launch on several; raises with the output when it
    exits with another code than `returncode`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=ROOT)
    if processes == 1:
        command = [sys.executable, "-m", *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", *args]
    result = subprocess.run(command, check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != returncode:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
