"""`python app.py`: the command line of the app, the model warm-up, and gradio's launch."""
import argparse
import logging
import os
from pathlib import Path

import torch

from sd_core.app.layout import CSS, build
from sd_core.app.parts import EMBEDDED, MODELS, Settings
from sd_core.app.serving import MAX_UPLOAD_BYTES


def arguments(argv=None) -> argparse.Namespace:
    """app.py's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", action="append", default=[], help="a folder of models visitors may pick from")
    parser.add_argument("--allow-hub", action="store_true", help="offer the curated hub models and let visitors "
                        "give any Hugging Face hub id (needs network)")
    parser.add_argument("--host", help="address to listen on (default: GRADIO_SERVER_NAME, else 127.0.0.1; "
                        "0.0.0.0 for other machines)")
    parser.add_argument("--port", type=int, help="port (default: GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public https://*.gradio.live link "
                        "to this machine (needs network; anyone with the link can use the app)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests computed at once")
    parser.add_argument("--max-queue", type=int, default=32, help="waiting requests before 'queue is full'")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: cores / concurrency; under "
                        "load one thread per request measured 2-5x faster than two on a CPU)")
    parser.add_argument("--no-mcp", dest="mcp", action="store_false", help="do not serve the endpoints as MCP tools "
                        "for agents (served by default at /gradio_api/mcp/, beside the API they wrap)")
    return parser.parse_args(argv)


def main(argv=None, comparisons=None):
    """Parse the command line, warm the embedded models, build the page (Compare over `comparisons`), launch."""
    args = arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Settings.model_roots += [Path(p).resolve() for p in args.models_dir]
    Settings.allow_hub = Settings.allow_hub or args.allow_hub
    for name in EMBEDDED:  # warm: the first page shows a picture at once
        MODELS.get(name)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, args.concurrency)))
    demo = build(comparisons).queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    serve(demo, args)


def serve(demo, args, block: bool = True) -> str:
    """Launch `demo` as the command line asks and say where it is, in this command line's words (gradio's own hint
    names launch(share=True), not --share); returns the local URL. `block`: wait until the server stops."""
    where = {key: value for key, value in (("server_name", args.host), ("server_port", args.port)) if value is not None}
    # no host/port given: gradio reads GRADIO_SERVER_NAME/_PORT; larger uploads are refused before they are kept
    _, local_url, share_url = demo.launch(share=args.share, css=CSS, max_file_size=MAX_UPLOAD_BYTES, quiet=True,
                                          mcp_server=args.mcp, prevent_thread_lock=True, **where)
    print(f"* Running on local URL:  {local_url}")
    if not share_url:
        print("* python app.py --share also opens a temporary public link to this machine.")
    if block:
        demo.block_thread()
    return local_url
