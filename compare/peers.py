"""Peers beside diffusers in the benchmark: OpenVINO (plain `openvino`, converting the same torch modules; the
optimum-intel exporter pins transformers and huggingface_hub below this project's versions and pulls torchvision, so
it cannot share this environment). A peer row times sd_core's fast path (the hardware's precision, channels_last)
against the peer in the diffusers column, both from the same random weights, with each one's PSNR from sd_core's
parity output. Rows appear only where the peer is installed (`pip install openvino`)."""
import importlib.util

import torch

from .measure import Pair, tensor_psnr


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


class DenoiserOutput(torch.nn.Module):
    """diffusers' UNet as a module returning the tensor (`.sample`), for OpenVINO's converter."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, encoder_hidden_states=context).sample


def openvino_unet_pair(reference, run_ours, inputs: tuple, exact) -> Pair:
    """diffusers' fp32 UNet converted by OpenVINO and compiled for the CPU with its default settings (OpenVINO infers
    in bf16 on CPUs with AMX/AVX512-BF16, as sd_core's fast path does) against `run_ours`, sd_core's fast UNet step
    on the same inputs. `exact`: sd_core's parity output."""
    import openvino as ov
    sample, t, context = inputs
    with torch.no_grad():
        model = ov.convert_model(DenoiserOutput(reference), example_input=(sample, t, context))
    compiled = ov.Core().compile_model(model, "CPU")
    request = compiled.create_infer_request()

    def run_peer():
        request.infer([sample.numpy(), t.numpy(), context.numpy()])
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    print(f"OpenVINO {ov.__version__} infers in {precision}", flush=True)
    return Pair(run_ours, run_peer, psnr=lambda: tensor_psnr(run_ours(), exact()),
                peer_psnr=lambda: tensor_psnr(run_peer(), exact()), dtype=torch.bfloat16)
