"""Big models on small devices: model-level CPU offload built on accelerate's hooks.

Each component lives in CPU memory and moves to the execution device only while it runs; when the next
component starts, the previous one goes back (accelerate's `cpu_offload_with_hook`, chained in the order
a pipeline calls them: text encoders, then the denoiser, then the VAE). Peak device memory is then the
largest component instead of their sum (SDXL in fp16: the 5.1 GB UNet instead of 6.9 GB in all).

    offload = enable_model_cpu_offload(pipe, "cuda")
    text_to_image(pipe, "a castle", steps=30)     # components hop to the GPU one at a time
    offload.remove()                              # back to plain modules (on the CPU)
"""
import dataclasses

import torch

# The order a pipeline runs its components in; each hook hands the device on to the next.
EXECUTION_ORDER = ("text_encoder", "text_encoder_2", "transformer", "unet", "vae")
HOOKED_METHODS = ("encode", "decode")  # the VAE is called through these, not forward()


@dataclasses.dataclass
class Offload:
    hooks: dict  # component name -> accelerate's UserCpuOffloadHook

    def remove(self):
        """Take the hooks off and leave every component on the CPU."""
        for hook in self.hooks.values():
            hook.offload()
            hook.remove()
            for name in HOOKED_METHODS:
                hook.model.__dict__.pop(name, None)  # the class's own method again
        self.hooks.clear()


def enable_model_cpu_offload(pipe, device: str | torch.device = "cuda") -> Offload:
    """Hook the pipeline's models so each runs on `device` and waits on the CPU otherwise."""
    from accelerate import cpu_offload_with_hook

    hooks, previous = {}, None
    for name in EXECUTION_ORDER:
        model = pipe.models.get(name)
        if model is None:
            continue
        model.to("cpu")
        _, previous = cpu_offload_with_hook(model, torch.device(device), prev_module_hook=previous)
        for method in HOOKED_METHODS:
            if hasattr(model, method):
                setattr(model, method, through_hook(model, getattr(model, method)))
        hooks[name] = previous
    return Offload(hooks)


def through_hook(model: torch.nn.Module, method):
    """`method` of `model`, run as accelerate runs forward(): the hook first moves the model and the inputs."""
    def hooked(*args, **kwargs):
        args, kwargs = model._hf_hook.pre_forward(model, *args, **kwargs)
        return method(*args, **kwargs)
    return hooked


def execution_device(model: torch.nn.Module) -> torch.device:
    """Where a model computes: its offload hook's device, else where its weights are."""
    device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device
