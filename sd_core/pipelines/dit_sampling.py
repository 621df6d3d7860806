"""Class-conditional DiT sampling: class ids from names or numbers, guidance on all or the first three
latent channels, through the shared loop (sd_core.pipelines.sampling.denoise)."""
import torch

from sd_core.checkpoints.pipeline_classes import DiTPipeline
from sd_core.noise import randn_tensor
from sd_core.pipelines.metadata import tag
from sd_core.pipelines.offload import execution_device
from sd_core.pipelines.sampling import (GenerationResult, StepCallback, check_finite, decode, denoise, display_name,
                                        dtype_of, guide, image_seeds, resolve_seed, scheduler_name)
from sd_core.pipelines.settings import GUIDED_CHANNELS, DiTSettings, split_settings  # noqa: F401
from sd_core.schedulers import make_scheduler


def class_ids(pipe: DiTPipeline, labels) -> list[int]:
    """Class ids from ids or names (case-insensitive; an id2label entry may list several names, "a, b").

    A model whose id2label names fewer classes than it embeds (the embedded DiT names 18 of 1001 rows; the rest
    were never trained) accepts only the named ids; an unknown name is answered with the valid names."""
    names = {name.strip().lower(): i for i, label in pipe.id2label.items() for name in label.split(",")}
    num_classes = pipe.transformer.config.num_embeds_ada_norm
    valid = sorted(pipe.id2label) if 0 < len(pipe.id2label) < num_classes else range(num_classes)
    ids = []
    for label in labels:
        if isinstance(label, str) and label.strip().lower() in names:
            ids.append(names[label.strip().lower()])
        elif isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
            ids.append(int(label))
        else:
            close = [n for n in names if str(label).strip().lower() in n][:5]
            listing = f" Did you mean {close}?" if close else \
                f" This model's classes: {sorted(names, key=names.get)}." if len(names) <= 50 else ""
            raise ValueError(f"Unknown class label {label!r}.{listing}")
    for i in ids:
        if not 0 <= i < num_classes:
            raise ValueError(f"Class id {i} is outside this model's {num_classes} classes [0, {num_classes - 1}].")
        if i not in valid:
            raise ValueError(f"Class id {i} has no label: this model names only the classes "
                             f"{[f'{j}: {pipe.id2label[j]}' for j in valid]}.")
    return ids


@torch.no_grad()
def generate_dit(pipe: DiTPipeline, settings: DiTSettings, callback: StepCallback | None = None) -> GenerationResult:
    """Class-conditional sampling, one image per class label. Guidance is on all latent channels (diffusers) or,
    with guided_channels="first3", on the first three only, as the original DiT code does. A learned-sigma
    model's variance channels reach the sampler (DDPM samples with them; the others ignore them).
    seed_per_image: image k uses seed + k (A1111's rule), as in `generate`; default: diffusers' one generator."""
    labels = class_ids(pipe, list(settings.class_labels))
    steps, guidance_scale, seed_per_image = settings.steps, settings.guidance_scale, settings.seed_per_image
    guided_channels, scheduler, seed = settings.guided_channels, settings.scheduler, settings.seed
    c = pipe.transformer.config
    seed = resolve_seed(seed)
    seeds = image_seeds(seed, len(labels), seed_per_image)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    name = scheduler_name(pipe.scheduler_config, scheduler)
    sampler = make_scheduler(name, pipe.scheduler_config)
    states = [sampler.set_timesteps(steps) for _ in seeds]
    device, dtype = execution_device(pipe.transformer), dtype_of(pipe.transformer)
    guided = guidance_scale > 1
    shape = (len(labels) // len(seeds), c.in_channels, c.sample_size, c.sample_size)
    x = torch.cat([randn_tensor(shape, generator, dtype, device) for generator in generators])
    x = x * states[0].init_noise_sigma
    ids = torch.tensor(labels, device=device)
    guided_ids = torch.cat([ids, torch.full_like(ids, c.null_class)])  # DiT's order: [cond, uncond]
    split = c.in_channels if guided_channels == "all" else 3

    def predict(model_input, t):
        if not guided:
            return pipe.transformer(model_input, torch.as_tensor(t, device=device).reshape(1).expand(len(labels)),
                                    ids)
        timesteps = torch.as_tensor(t, device=device).reshape(1).expand(2 * len(labels))
        cond, uncond = pipe.transformer(torch.cat([model_input, model_input]), timesteps, guided_ids).chunk(2)
        return torch.cat([guide(uncond[:, :split], cond[:, :split], guidance_scale), cond[:, split:]], dim=1)

    x = denoise(sampler, states if seed_per_image else states[0], x, predict,
                generators if seed_per_image else generators[0], callback)
    check_finite(x, "the latents after denoising (DiT)")
    names = [pipe.id2label.get(i, str(i)) for i in labels]
    parameters = {"class_labels": labels, "class_names": names, "seed": seed, "steps": steps, "scheduler": name,
                  "guidance_scale": guidance_scale, "guided_channels": guided_channels,
                  "seed_per_image": seed_per_image, "model": display_name(pipe.source), "family": pipe.family,
                  **settings.fast_options()}
    return GenerationResult(tag(decode(pipe.vae, x), parameters, seeds), x, parameters)


def dit_sample(pipe: DiTPipeline, class_labels, *, callback: StepCallback | None = None, **options) -> GenerationResult:
    """generate_dit() with the settings as keywords (guidance_scale=4.0, steps=25, seed=..., guided_channels=...)."""
    fields, unknown = split_settings(DiTSettings, options)
    if unknown:
        raise TypeError(f"dit_sample takes no {', '.join(sorted(unknown))}.")
    labels = tuple(class_labels) if isinstance(class_labels, (list, tuple)) else (class_labels,)
    return generate_dit(pipe, DiTSettings(class_labels=labels, **fields), callback)
