"""The fast path's floating-point type, decided by what the hardware is, never by a timing.

A timing taken at start-up swings with the machine's load, so one process ran a request in bfloat16 and the next in
float32 (two images of one request, 20 dB apart). The rule instead reads capabilities that cannot change while the
machine runs:
- CPU: bfloat16 where torch reports bf16 matmul/conv kernels, AMX (Intel Sapphire Rapids and later) or AVX512-BF16
  (Intel Cooper Lake, AMD Zen 4 and later), and oneDNN is built in; float32 elsewhere (bf16 is emulated there, and
  slower than fp32).
- CUDA: bfloat16 from compute capability 8.0 (Ampere); float16 below (T4, V100), where a VAE whose config says
  force_upcast (SDXL's overflows in fp16) keeps decoding in float32.
"""
import dataclasses

import torch

BF16_CUDA_CAPABILITY = (8, 0)


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    reason: str  # the capability (or the setting) that decided, shown in the fast path's description

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_bf16_kernels() -> str | None:
    """The name of this CPU's native bf16 kernels ("amx", "avx512_bf16"), or None when it has none (or torch was
    built without oneDNN, which runs them)."""
    if not torch.backends.mkldnn.is_available():
        return None
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return None


def hardware_precision(device: torch.device | str) -> Precision:
    """The low-precision type this device runs natively (see the module's rule), else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        capability = f"cuda compute capability {major}.{minor}"
        low = torch.bfloat16 if (major, minor) >= BF16_CUDA_CAPABILITY else torch.float16
        return Precision(low, capability)
    if device.type == "cpu":
        kernels = cpu_bf16_kernels()
        return Precision(torch.bfloat16, f"cpu {kernels}") if kernels else \
            Precision(torch.float32, "cpu without bf16 kernels")
    return Precision(torch.float32, f"{device.type}: no rule")


def choose_precision(setting: str | bool, model_dtype: torch.dtype, device) -> Precision:
    """What the fast path runs a model of `model_dtype` in: bfloat16 when asked (True), the model's own type when
    not (False), and with "auto" the hardware's rule for float32 weights (weights loaded in half precision stay)."""
    if setting not in ("auto", True, False):
        raise ValueError(f"bf16 must be 'auto', True or False; got {setting!r}.")
    if setting is True:
        return Precision(torch.bfloat16, "asked")
    if setting is False or model_dtype != torch.float32:
        return Precision(model_dtype, "the model's own" if setting == "auto" else "asked")
    return hardware_precision(device)
