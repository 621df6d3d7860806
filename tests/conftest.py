import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Test servers take a port the OS picks (tests.launch.free_port): gradio's default, 7860 and up, is where a user's own
# `python app.py` listens. gradio reads GRADIO_SERVER_PORT and GRADIO_NUM_PORTS when it is imported; pointing them at
# one port this session holds makes a launch given no port fail ("Cannot find empty port") instead of taking 7860,
# here and in the app.py subprocesses that inherit this environment.
HELD_PORT = socket.socket()
HELD_PORT.bind(("127.0.0.1", 0))
HELD_PORT.listen(1)
os.environ["GRADIO_SERVER_PORT"] = str(HELD_PORT.getsockname()[1])
os.environ["GRADIO_NUM_PORTS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("SD_CORE_TEST_THREADS", os.cpu_count() or 1)))
