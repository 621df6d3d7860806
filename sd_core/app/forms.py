"""The forms' values <-> the settings records (sd_core.pipelines.settings), under the app's bounds.

A tab's form (and its API endpoint, whose parameters are named after the form's labels) speaks in its own names
(number_of_images, lora_1 / lora_1_scale, controlnet_1 / controlnet_1_scale / ..., "default" for the model's own
scheduler); everything else speaks in records. Every door of the app goes through here: a Generate click, an API
call, a share link being restored, a PNG dropped on PNG Info. So a hostile value gets the same message whichever
door it came through.
"""
import dataclasses

from sd_core.pipelines.settings import (
    DiTSettings,
    GenerationSettings,
    Limits,
    flag,
    one_of,
    real_number,
    unset,
    whole_number,
)
from sd_core.pipelines.control_images import PREPROCESSORS

FORM_LIMITS = Limits(max_steps=100, max_side=1024, max_batch=8, max_prompt_chars=2000,
                     max_guidance=50, max_loras=2, max_controlnets=2)
MODEL_DEFAULT = "default"  # the scheduler choice meaning "the one the model's own scheduler config names"
DEEPCACHE_CHOICES = [("off", 0), ("2", 2), ("3", 3)]
TOME_CHOICES = [("off", 0.0), ("50%", 0.5), ("75%", 0.75)]
SHARE_CHOICES = [("off", 1.0), ("80%", 0.8), ("70%", 0.7), ("50%", 0.5)]  # guidance_until, tgate: 1.0 is "off"
SD_FAST = {"deepcache": (0, DEEPCACHE_CHOICES), "tome": (0.0, TOME_CHOICES), "guidance_until": (1.0, SHARE_CHOICES),
           "tgate": (1.0, SHARE_CHOICES)}  # field -> (off, the dropdown's choices)
DIT_FAST = {"dit_cache": (0, DEEPCACHE_CHOICES), "guidance_until": (1.0, SHARE_CHOICES)}
LORA_SLOTS = (1, 2)
CONTROLNET_SLOTS = tuple(range(1, FORM_LIMITS.max_controlnets + 1))
CONTROLNET_FIELDS = ("preprocessor", "scale", "start", "end")  # controlnet_N_<field>, in the record's unit order
CONTROLNET_DEFAULTS = {"preprocessor": "none", "scale": 1.0, "start": 0.0, "end": 1.0}
NOT_SETTINGS = ("show_trajectory", "image", "image_and_mask")  # form inputs that are not part of the record


def choice_of(value, name: str, choices: list):
    """One of a dropdown's values (numbers compared as numbers: a link sends "2" for 2; true is not 1)."""
    values = [v for _, v in choices]
    for v in values:
        if not isinstance(value, bool) and (value == v or str(value) == str(v)):
            return v
    return one_of(value, name, [str(v) for v in values])


def fast_values(values: dict, fields: dict) -> dict:
    """The fast path's form values, each checked against its dropdown's choices whether or not `fast` is on; all
    "off" unless it is (what is off is not recorded)."""
    fast = flag(values.get("fast"), "fast")
    asked = {name: choice_of(unset(values.get(name), off), name, choices) for name, (off, choices) in fields.items()}
    return {"fast": fast, **(asked if fast else {name: off for name, (off, _) in fields.items()})}


def settings_from_form(form: dict) -> GenerationSettings:
    """The record of a Text to image / Image to image / Inpaint form (or API call, or share link)."""
    values = {key: value for key, value in form.items()
              if key not in NOT_SETTINGS and not key.startswith(("lora_", "controlnet_"))}
    values["images_per_prompt"] = whole_number(values.pop("number_of_images", 1), "number_of_images", 1,
                                               FORM_LIMITS.max_batch)
    if values.get("scheduler") == MODEL_DEFAULT:
        values["scheduler"] = None
    scales = {i: real_number(form.get(f"lora_{i}_scale", 1.0), f"lora_{i}_scale", -4, 4) for i in LORA_SLOTS}
    values["loras"] = [(form[f"lora_{i}"], scales[i]) for i in LORA_SLOTS if form.get(f"lora_{i}")]
    units = {i: [controlnet_field(form, i, field) for field in CONTROLNET_FIELDS] for i in CONTROLNET_SLOTS}
    values["controlnets"] = [(form[f"controlnet_{i}"], *units[i]) for i in CONTROLNET_SLOTS
                             if form.get(f"controlnet_{i}")]
    values.update(fast_values(values, SD_FAST))
    return GenerationSettings.from_values({**values, "seed_per_image": True}, FORM_LIMITS)


def form_from_settings(settings: GenerationSettings) -> dict:
    """A form's values for a record (what a share link carries and PNG Info fills in): the inverse of
    settings_from_form, leaving out what the record does not set."""
    values = {key: value for key, value in settings.to_dict().items()
              if key not in ("images_per_prompt", "loras", "controlnets", "seed_per_image", "seed")}
    values.update(number_of_images=settings.images_per_prompt, seed=-1 if settings.seed is None else settings.seed,
                  scheduler=settings.scheduler or MODEL_DEFAULT, embeddings=list(settings.embeddings))
    for i, (name, scale) in zip(LORA_SLOTS, settings.loras):
        values.update({f"lora_{i}": name, f"lora_{i}_scale": scale})
    for i, (name, *unit) in zip(CONTROLNET_SLOTS, settings.controlnets):
        values.update({f"controlnet_{i}": name, **{f"controlnet_{i}_{field}": value
                                                   for field, value in zip(CONTROLNET_FIELDS, unit)}})
    return values


def controlnet_field(form: dict, slot: int, field: str):
    """ControlNet `slot`'s preprocessor, scale, start or end as the form sent it (its default when not sent),
    checked by its form name whether or not the slot has a ControlNet (the unit's rule checks them again)."""
    name = f"controlnet_{slot}_{field}"
    value = unset(form.get(name), CONTROLNET_DEFAULTS[field])
    if field == "preprocessor":
        return one_of(value, name, PREPROCESSORS)
    return real_number(value, name, 0, 2 if field == "scale" else 1)


def dit_settings_from_form(form: dict) -> DiTSettings:
    """The record of a DiT form: one class label drawn number_of_images times."""
    values = {key: value for key, value in form.items() if key not in ("class_label", "number_of_images")}
    count = whole_number(form.get("number_of_images", 1), "number_of_images", 1, FORM_LIMITS.max_batch)
    if values.get("scheduler") == MODEL_DEFAULT:
        values["scheduler"] = None
    label = form.get("class_label")
    values["class_labels"] = [label if isinstance(label, int) else str(label)] * count
    values.update(fast_values(values, DIT_FAST))
    return DiTSettings.from_values({**values, "seed_per_image": True}, FORM_LIMITS)


def dit_form_from_settings(settings: DiTSettings) -> dict:
    values = {key: value for key, value in dataclasses.asdict(settings).items()
              if key not in ("class_labels", "seed_per_image", "seed")}
    values.update(class_label=settings.class_labels[0], number_of_images=len(settings.class_labels),
                  seed=-1 if settings.seed is None else settings.seed, scheduler=settings.scheduler or MODEL_DEFAULT)
    return values
