"""Share links: a link that reopens the app on a tab with a result's settings, and their restore on page load
(which also shows a first result on the embedded models).

A link carries a tab's form values (named as its API parameters); restoring reads them back through the settings
record (sd_core.app.forms), so a link gets exactly the bounds and messages the form gets. Pictures a visitor
uploaded (Image to image's starting image, Inpaint's image and mask, each ControlNet's image) cannot travel in a
link: the link says so, and a restored form keeps its own pictures and waits for them before running.
"""
import inspect
import os
import re
import urllib.parse

import gradio as gr

from sd_core.app.model_choices import EMBEDDED
from sd_core.app.parts import as_page_text


PICTURES = (gr.Image, gr.ImageEditor)  # inputs a link cannot carry


def share_link(tab: str, form: dict, fn, request: gr.Request | None = None, left_behind=()) -> str:
    """A Markdown link that reopens the app on this tab with these form values (those `fn`, the tab's handler,
    takes), read back by `restore`. Absolute: the Space's page on a Space, else the page the request came from.
    `left_behind`: the pictures the result needs that the link cannot carry (said beside it)."""
    parameters = inspect.signature(fn).parameters
    carried = {key: value for key, value in form.items() if key in parameters and value not in (None, "", [])}
    query = urllib.parse.urlencode({"tab": tab, **carried}, doseq=True)
    if os.environ.get("SPACE_ID"):
        base = f"https://huggingface.co/spaces/{os.environ['SPACE_ID']}"
    elif request is not None and request.headers.get("referer"):
        base = request.headers["referer"].split("?")[0].split("#")[0]
    else:
        base = ""
    if not left_behind:
        return f"[🔗 Link to this result and its settings]({base}?{query})"
    them = " and ".join(left_behind)
    return (f"[🔗 Link to these settings]({base}?{query}) ({them} cannot travel in a link: upload "
            f"{'it' if len(left_behind) == 1 else 'them'} again after opening it)")


def pictures_needed(values: dict) -> list[str]:
    """The uploads a tab's restored values need and a link cannot carry: the starting image, the image and mask,
    and the image of each ControlNet the link names."""
    needed = [what for name, what in (("image", "the starting image"), ("image_and_mask", "the image and its mask"))
              if name in values]
    return needed + [f"ControlNet {name.split('_')[1]}'s image" for name, value in values.items()
                     if re.fullmatch(r"controlnet_\d+", name) and value]


def offered(component, value) -> bool:
    """Whether a dropdown or radio offers `value` (any value fits a free component)."""
    if not isinstance(component, (gr.Dropdown, gr.Radio)) or getattr(component, "allow_custom_value", False):
        return True
    values = [v for _, v in component.choices]
    return all(v in values for v in value) if isinstance(value, list) else value in values


def every_value(query, name: str) -> list:
    """All values of a repeated query parameter (a multiselect's), from starlette's QueryParams or a plain dict."""
    return query.getlist(name) if hasattr(query, "getlist") else [query[name]]


def linked_values(query, fn, inputs: list, to_settings, to_form) -> list:
    """The form values a link asks for, read through the settings record; a link that does not fit (a value out
    of bounds, not offered, or not of its kind) leaves the form as it is, with a warning shown as text."""
    names = list(inspect.signature(fn).parameters)[:len(inputs)]
    defaults = dict(zip(names, [component.value for component in inputs]))
    given = {name: every_value(query, name) if isinstance(defaults[name], list) else query[name]
             for name in names if name in query}
    if not given:
        return list(defaults.values())
    try:
        form = to_form(to_settings({**defaults, **given}))
        values = {**defaults, **{name: form[name] for name in given if name in form}}
        refused = [name for name, component in zip(names, inputs) if not offered(component, values[name])]
        if refused:
            raise ValueError(f"{', '.join(refused)} {'is' if len(refused) == 1 else 'are'} not offered here")
    except ValueError as error:
        gr.Warning(as_page_text(f"This link's settings do not fit this app ({error}); the form keeps its values."))
        return list(defaults.values())
    return list(values.values())


def restore(shareable: dict, request: gr.Request | None):
    """Page load: the settings of a shared link (?tab=...&model=...), and on the embedded models a first result so
    nobody looks at empty boxes. `shareable`: tab -> (handler, inputs, outputs, form -> record, record -> form).
    Returns updates for the tabs, then each tab's inputs and outputs."""
    query = request.query_params if request is not None else {}
    tab = query.get("tab") if query.get("tab") in shareable else "text_to_image"
    updates = [gr.Tabs(selected=tab)]
    for name, (fn, inputs, outputs, to_settings, to_form) in shareable.items():
        if name != tab:
            updates += [gr.skip()] * (len(inputs) + len(outputs))
            continue
        values = linked_values(query, fn, inputs, to_settings, to_form)
        results = [gr.skip()] * len(outputs)
        needed = pictures_needed(dict(zip(inspect.signature(fn).parameters, values)))
        values = [gr.skip() if isinstance(component, PICTURES) else value for component, value in zip(inputs, values)]
        if needed:
            gr.Warning(f"This link carries the settings but not {' or '.join(needed)} (a link cannot hold pictures): "
                       f"upload {'it' if len(needed) == 1 else 'them'}, then run.")
        elif values[0] in EMBEDDED:  # fast; a hub model waits for the visitor's click (it may download gigabytes)
            try:
                results = list(fn(*values, request=request))
            except gr.Error as error:
                gr.Warning(as_page_text(f"The link's settings did not run: {error.message}"))
        updates += values + results
    return updates
