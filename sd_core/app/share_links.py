"""Share links: a link that reopens the app on a tab with a result's settings, and their restore on page load
(which also shows a first result on the embedded models).

This module may import gradio; the models, pipelines and schedulers never do.
"""
import inspect
import os
import urllib.parse

import gradio as gr

from sd_core.app.model_choices import EMBEDDED


def share_link(tab: str, settings: dict, request: gr.Request | None = None) -> str:
    """A Markdown link that reopens the app on this tab with these settings (read back by `restore`)."""
    query = urllib.parse.urlencode({"tab": tab, **{k: v for k, v in settings.items() if v is not None}})
    if os.environ.get("SPACE_ID"):
        base = f"https://huggingface.co/spaces/{os.environ['SPACE_ID']}"
    elif request is not None and request.headers.get("referer"):
        base = request.headers["referer"].split("?")[0].split("#")[0]
    else:
        base = ""
    return f"[🔗 Link to this result and its settings]({base}?{query})"


def query_value(component, text: str):
    """A setting read from a shared link, in the component's type; None when it does not fit the component."""
    try:
        if isinstance(component, gr.Checkbox):
            return text.lower() == "true"
        if isinstance(component, (gr.Slider, gr.Number)):
            number = float(text)
            return int(number) if number.is_integer() else number
    except ValueError:
        return None
    if isinstance(component, (gr.Dropdown, gr.Radio)) and not getattr(component, "allow_custom_value", False):
        return next((value for _, value in component.choices if str(value) == text), None)  # ints too
    return text


def restore(shareable: dict, request: gr.Request | None):
    """Page load: the settings of a shared link (?tab=...&model=...), and on the embedded models a first result so
    nobody looks at empty boxes. Returns updates for the tabs, then each tab's inputs and outputs."""
    query = dict(request.query_params) if request is not None else {}
    tab = query.get("tab") if query.get("tab") in shareable else "text_to_image"
    updates = [gr.Tabs(selected=tab)]
    for name, (fn, inputs, outputs) in shareable.items():
        if name != tab:
            updates += [gr.skip()] * (len(inputs) + len(outputs))
            continue
        values = [component.value for component in inputs]
        for i, (parameter, component) in enumerate(zip(inspect.signature(fn).parameters, inputs)):
            if parameter in query:
                value = query_value(component, query[parameter])
                if value is None:
                    gr.Warning(f"The link's {parameter}={query[parameter]!r} does not fit this app; kept {values[i]!r}.")
                else:
                    values[i] = value
        results = [gr.skip()] * len(outputs)
        if values[0] in EMBEDDED:  # fast; a hub model waits for the visitor's click (it may download gigabytes)
            try:
                results = list(fn(*values, request=request))
            except gr.Error as error:
                gr.Warning(f"The link's settings did not run: {error.message}")
        updates += values + results
    return updates
