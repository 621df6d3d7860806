"""Text conditioning as each family's reference pipeline builds it: prompt encoding (plain or A1111 syntax,
clip_skip), the [uncond, cond] guidance batch, and SDXL's micro-conditioning time ids."""
import warnings

import torch

from sd_core.checkpoints.pipeline_classes import StableDiffusionPipeline
from sd_core.pipelines.offload import execution_device
from sd_core.pipelines.prompt_syntax import conditioning_states, encode_weighted_prompt, encode_weighted_prompt_sdxl
from sd_core.pipelines.settings import PROMPT_SYNTAXES
from sd_core.tokenizer import CLIPTokenizer


def dropped_text(tokenizer: CLIPTokenizer, prompt: str) -> str:
    """The part of a prompt past CLIP's window (77 tokens with start and end), which plain syntax ignores as
    diffusers does; "" when the prompt fits."""
    tokens = tokenizer.tokenize(prompt)
    room = tokenizer.model_max_length - 2
    return tokenizer.decode(tokens[room:]) if len(tokens) > room else ""


def encode_text(tokenizer: CLIPTokenizer, prompts: list[str], device) -> torch.Tensor:
    """Padded ids of each prompt, warning (with the dropped text) when one is truncated."""
    for prompt in prompts:
        dropped = dropped_text(tokenizer, prompt)
        if dropped:
            warnings.warn(f"The prompt is longer than CLIP's {tokenizer.model_max_length} tokens and was truncated; "
                          f"this part was ignored: {dropped!r}", stacklevel=3)
    return tokenizer.pad([tokenizer.tokenize(prompt) for prompt in prompts]).to(device)


def embed_text(pipe: StableDiffusionPipeline, texts: list[str], clip_skip: int = 0):
    """(hidden states, pooled projection or None) as the family's reference pipeline builds them: the last
    hidden state, or the penultimate ones of every encoder concatenated (SDXL). clip_skip > 0 takes the
    layer diffusers' clip_skip takes (`prompts.conditioning_states`)."""
    device = execution_device(pipe.unet)
    penultimate = pipe.traits.hidden_states == "penultimate"
    states, pooled = [], None
    for slot in pipe.traits.text_encoders:
        encoder, tokenizer = getattr(pipe, slot.component), getattr(pipe, slot.tokenizer)
        if clip_skip:
            hidden, slot_pooled = conditioning_states(encoder, encode_text(tokenizer, texts, device), clip_skip,
                                                      penultimate)
            states.append(hidden)
            pooled = slot_pooled if slot.projected else pooled
            continue
        if not penultimate:
            states.append(encoder(encode_text(tokenizer, texts, device)).last_hidden_state)
            continue
        out = encoder(encode_text(tokenizer, texts, device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out.pooled_output if slot.projected else pooled
    return torch.cat(states, dim=-1), pooled


def embed_weighted_text(pipe: StableDiffusionPipeline, texts: list[str], clip_skip: int = 0):
    """A1111's syntax (sd_core.pipelines.prompt_syntax): all `texts` encoded in one call, so they share one chunk count."""
    slots = pipe.traits.text_encoders
    if pipe.traits.hidden_states == "penultimate":
        return encode_weighted_prompt_sdxl([getattr(pipe, slot.tokenizer) for slot in slots],
                                           [getattr(pipe, slot.component) for slot in slots], texts, clip_skip)
    (slot,) = slots
    return encode_weighted_prompt(getattr(pipe, slot.tokenizer), getattr(pipe, slot.component), texts, clip_skip), None


def encode_prompt(pipe: StableDiffusionPipeline, prompts: list[str], negatives: list[str] | None, guided: bool,
                  prompt_syntax: str = "plain", clip_skip: int = 0):
    """Text conditioning (embeddings, pooled); with guidance batched as [uncond, cond].

    clip_skip applies to the negative prompt too. (diffusers 0.42 applies it to the positive prompt only, so its
    guidance subtracts conditioning from two different layers; A1111 and ComfyUI encode both from the same
    layer, which is what guidance assumes. With clip_skip=0 both readings agree.)"""
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {PROMPT_SYNTAXES}; got {prompt_syntax!r}.")
    zeros = guided and negatives is None and pipe.traits.zeros_for_empty_negative
    if prompt_syntax == "a1111":
        if not guided or zeros:
            embeddings, pooled = embed_weighted_text(pipe, prompts, clip_skip)
        else:  # negatives and prompts in one call: they share a chunk count
            both, both_pooled = embed_weighted_text(pipe, (negatives or [""] * len(prompts)) + prompts, clip_skip)
            return both, both_pooled
    else:
        embeddings, pooled = embed_text(pipe, prompts, clip_skip)
    if not guided:
        return embeddings, pooled
    if zeros:
        negative, negative_pooled = torch.zeros_like(embeddings), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = embed_text(pipe, negatives or [""] * len(prompts), clip_skip)
    embeddings = torch.cat([negative, embeddings])
    pooled = torch.cat([negative_pooled, pooled]) if pooled is not None else None
    return embeddings, pooled


def as_list(prompt, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a string or a list of strings.")
    return prompts



def time_ids(pipe: StableDiffusionPipeline, size: tuple[int, int], original_size=None, crops_coords_top_left=(0, 0),
             target_size=None, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5) -> tuple:
    """SDXL's micro-conditioning ids, (positive, negative): original size + crop corner + target size (the base, 6
    numbers), or original size + crop corner + aesthetic score (the refiner, 5 numbers), whose negative carries
    negative_aesthetic_score and diffusers' default negative crop corner (0, 0), as its SDXL img2img pipeline
    does."""
    original_size = tuple(original_size or size)
    crops = tuple(crops_coords_top_left)
    if pipe.traits.requires_aesthetics_score:
        return original_size + crops + (aesthetic_score,), original_size + (0, 0) + (negative_aesthetic_score,)
    ids = original_size + crops + tuple(target_size or size)
    return ids, ids


def pooled_width(pipe: StableDiffusionPipeline) -> int:
    """The width of the pooled text embedding SDXL's add_embedding takes beside the embedded time ids."""
    c = pipe.unet.config
    return c.projection_class_embeddings_input_dim - len(time_ids(pipe, (0, 0))[0]) * c.addition_time_embed_dim


def added_conditioning(pipe: StableDiffusionPipeline, pooled: torch.Tensor | None, rows: int, guided: bool,
                       size: tuple[int, int], original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                       aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5) -> dict | None:
    """SDXL's `added_cond_kwargs` for a batch of `rows` UNet rows ([uncond, cond] halves when guided): the
    pooled text embeddings and the micro-conditioning time ids (see `time_ids`). None for models without them
    (SD 1.x/2.x)."""
    if pipe.unet.config.addition_embed_type != "text_time":
        return None
    device = execution_device(pipe.unet)
    ids, negative_ids = time_ids(pipe, size, original_size, crops_coords_top_left, target_size, aesthetic_score,
                                 negative_aesthetic_score)
    ids = torch.tensor([ids], dtype=pooled.dtype, device=device)
    if guided:
        negative_ids = torch.tensor([negative_ids], dtype=pooled.dtype, device=device)
        batch_ids = torch.cat([negative_ids.repeat(rows // 2, 1), ids.repeat(rows // 2, 1)])
    else:
        batch_ids = ids.repeat(rows, 1)
    return {"text_embeds": pooled, "time_ids": batch_ids}
