"""The app's gr.Blocks: gradio checks an API call's values before sd_core's handler runs (how many there are, whether
a file parameter holds an uploaded file, whether the file decodes), and its own failures there reach the caller as a
bare "error" without a message. `Blocks` answers each with one line naming the parameter and the fix, as sd_core's
own checks do."""
import gradio as gr
import pydantic
from gradio.exceptions import ComponentProcessingError, InvalidPathError

FILE_FIX = "upload the file (the page does; gradio_client's handle_file() does) and pass what the upload returns"


def parameter_name(block) -> str:
    return getattr(block, "label", None) or type(block).__name__


def input_problem(block_fn, inputs: list, error: Exception) -> str:
    """One line for a failure in gradio's preprocessing: which value, what was wrong, how to send it."""
    wanted, api = len(block_fn.inputs), block_fn.api_name or block_fn.name
    if len(inputs) < wanted:
        return (f"/{api} takes {wanted} values, one per parameter in order (see the API page); got {len(inputs)}. "
                f"Leave none out: gradio_client fills in defaults only for the ones you name.")
    if isinstance(error, InvalidPathError):
        return f"A file path that was not uploaded to this app was sent: {FILE_FIX}."
    for block, value in zip(block_fn.inputs, inputs):
        model = getattr(block, "data_model", None)
        if model is None or value is None:
            continue
        try:
            model.model_validate(value, context={"validate_meta": True})
        except (pydantic.ValidationError, ValueError, TypeError):
            return f"{parameter_name(block)}: expected an uploaded file; got {type(value).__name__}: {FILE_FIX}."
    if isinstance(error, ComponentProcessingError):
        return ("Cannot read an upload as an image: it is not a PNG, JPEG or WebP file, or it is damaged. Send the "
                "picture itself.")
    return f"A value does not fit this endpoint's parameters ({type(error).__name__}); see the API page for each type."


class Blocks(gr.Blocks):
    """gr.Blocks whose preprocessing failures answer with sd_core's one-line message instead of a bare error."""

    async def preprocess_data(self, block_fn, inputs, state, explicit_call: bool = False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as error:
            raise gr.Error(input_problem(block_fn, list(inputs), error), print_exception=False) from None
