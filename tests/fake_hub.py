"""A loopback fake of the Hugging Face Hub, serving the real file layouts of two pipeline repos.

It answers the endpoints huggingface_hub 2.4 calls for `model_info`/`repo_info`, `list_repo_tree`,
`hf_hub_download` and `snapshot_download`:
    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]    repo info, siblings (with sizes if blobs)
    GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=   tree listing, paginated by a Link header
    HEAD /{repo}/resolve/{rev}/{path}                        X-Repo-Commit, ETag, Content-Length, and for
                                                             LFS files X-Linked-Etag / X-Linked-Size
    GET  /{repo}/resolve/{rev}/{path}                        the bytes (Range "bytes=N-" for resumes)
Errors carry the real X-Error-Code headers (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo),
which huggingface_hub turns into its own exceptions. LFS files are answered directly (the real Hub
redirects them to a CDN host; the metadata headers are the same). Files without content are
placeholders of their declared size, streamed as zeros: a correct client never asks for them.

The layouts: every path of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0
with its size in bytes. Sources: files over 1 MiB from a published `HfApi().model_info(...,
files_metadata=True)` dump of both repos; the small configs and tokenizer files from published
download manifests (the stable-diffusion-v1-5/stable-diffusion-v1-5 mirror, pinned at 451f4fe, for SD 1.5;
airunner's SDXL 1.0 bootstrap sizes). Sizes marked `# estimate` were in neither source (README,
images, .gitattributes, a few ONNX/OpenVINO headers); neither the old nor the new download touches them.
"""
import hashlib
import json
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import torch

from tests import tiny

SD15_FILES = {
    ".gitattributes": 1548,  # estimate
    "README.md": 14461,
    "feature_extractor/preprocessor_config.json": 342,
    "model_index.json": 541,
    "safety_checker/config.json": 4723,
    "safety_checker/model.fp16.safetensors": 608018440,
    "safety_checker/model.safetensors": 1215981830,
    "safety_checker/pytorch_model.bin": 1216061799,
    "safety_checker/pytorch_model.fp16.bin": 608103564,
    "scheduler/scheduler_config.json": 308,
    "text_encoder/config.json": 617,
    "text_encoder/model.fp16.safetensors": 246144864,
    "text_encoder/model.safetensors": 492265874,
    "text_encoder/pytorch_model.bin": 492305335,
    "text_encoder/pytorch_model.fp16.bin": 246187076,
    "tokenizer/merges.txt": 524619,
    "tokenizer/special_tokens_map.json": 472,
    "tokenizer/tokenizer_config.json": 806,
    "tokenizer/vocab.json": 1059962,
    "unet/config.json": 743,
    "unet/diffusion_pytorch_model.bin": 3438354725,
    "unet/diffusion_pytorch_model.fp16.bin": 1719327893,
    "unet/diffusion_pytorch_model.fp16.safetensors": 1719125304,
    "unet/diffusion_pytorch_model.non_ema.bin": 3438366373,
    "unet/diffusion_pytorch_model.non_ema.safetensors": 3438167536,
    "unet/diffusion_pytorch_model.safetensors": 3438167540,
    "v1-5-pruned-emaonly.ckpt": 4265380512,
    "v1-5-pruned-emaonly.safetensors": 4265146304,
    "v1-5-pruned.ckpt": 7703807346,
    "v1-5-pruned.safetensors": 7703324286,
    "v1-inference.yaml": 1873,  # estimate
    "vae/config.json": 547,
    "vae/diffusion_pytorch_model.bin": 334707217,
    "vae/diffusion_pytorch_model.fp16.bin": 167405651,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167335342,
    "vae/diffusion_pytorch_model.safetensors": 334643276,
}
SDXL_BASE_FILES = {
    ".gitattributes": 1683,  # estimate
    "01.png": 4608613,
    "LICENSE.md": 14109,
    "README.md": 8542,  # estimate
    "comparison.png": 130848,  # estimate
    "model_index.json": 609,
    "pipeline.png": 80478,  # estimate
    "scheduler/scheduler_config.json": 479,
    "sd_xl_base_1.0.safetensors": 6938078334,
    "sd_xl_base_1.0_0.9vae.safetensors": 6938078334,
    "sd_xl_offset_example-lora_1.0.safetensors": 49553604,
    "text_encoder/config.json": 565,
    "text_encoder/flax_model.msgpack": 492248682,
    "text_encoder/model.fp16.safetensors": 246144152,
    "text_encoder/model.onnx": 492587457,
    "text_encoder/model.safetensors": 492265168,
    "text_encoder/openvino_model.bin": 492242672,
    "text_encoder/openvino_model.xml": 1057789,
    "text_encoder_2/config.json": 575,
    "text_encoder_2/flax_model.msgpack": 2778657095,
    "text_encoder_2/model.fp16.safetensors": 1389382176,
    "text_encoder_2/model.onnx": 708192,  # estimate
    "text_encoder_2/model.onnx_data": 2778639360,
    "text_encoder_2/model.safetensors": 2778702264,
    "text_encoder_2/openvino_model.bin": 2778640120,
    "text_encoder_2/openvino_model.xml": 2790191,
    "tokenizer/merges.txt": 524619,
    "tokenizer/special_tokens_map.json": 472,
    "tokenizer/tokenizer_config.json": 737,
    "tokenizer/vocab.json": 1059962,
    "tokenizer_2/merges.txt": 524619,
    "tokenizer_2/special_tokens_map.json": 460,
    "tokenizer_2/tokenizer_config.json": 725,
    "tokenizer_2/vocab.json": 1059962,
    "unet/config.json": 1680,
    "unet/diffusion_flax_model.msgpack": 10269915611,
    "unet/diffusion_pytorch_model.fp16.safetensors": 5135149760,
    "unet/diffusion_pytorch_model.safetensors": 10270077736,
    "unet/model.onnx": 7293842,
    "unet/model.onnx_data": 10269854720,
    "unet/openvino_model.bin": 10269856428,
    "unet/openvino_model.xml": 22577438,
    "vae/config.json": 642,
    "vae/diffusion_flax_model.msgpack": 334623853,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167335342,
    "vae/diffusion_pytorch_model.safetensors": 334643268,
    "vae_1_0/config.json": 607,
    "vae_1_0/diffusion_pytorch_model.fp16.safetensors": 167335342,
    "vae_1_0/diffusion_pytorch_model.safetensors": 334643268,
    "vae_decoder/config.json": 607,
    "vae_decoder/model.onnx": 198093688,
    "vae_decoder/openvino_model.bin": 197961232,
    "vae_decoder/openvino_model.xml": 811524,  # estimate
    "vae_encoder/config.json": 607,
    "vae_encoder/model.onnx": 136775724,
    "vae_encoder/openvino_model.bin": 136655184,
    "vae_encoder/openvino_model.xml": 683812,  # estimate
}
# The repos' own model_index.json (their component lists are what the fetch reads).
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"]}
SDXL_BASE_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True, "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
REAL_REPOS = {"runwayml/stable-diffusion-v1-5": ("sd1", SD15_FILES, SD15_MODEL_INDEX),
              "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", SDXL_BASE_FILES, SDXL_BASE_MODEL_INDEX)}
# Single-model ControlNet repos: config.json and the weights at the root, with .bin and fp16 twins and sample
# images beside them. The paths are the repos' own; the weights' sizes are the Hub's listing (1.45 GB, 723 MB,
# 5.0 GB, 2.5 GB) taken to the byte by estimate, and the small files are estimates too: sd_core never fetches
# the placeholders, and config.json is served with a tiny model's real content.
CONTROLNET_SD15_CANNY_FILES = {
    ".gitattributes": 1519,  # estimate
    "README.md": 7781,  # estimate
    "config.json": 1095,  # estimate (served: the tiny model's)
    "diffusion_pytorch_model.bin": 1445254969,  # estimate
    "diffusion_pytorch_model.fp16.bin": 722698343,  # estimate
    "diffusion_pytorch_model.fp16.safetensors": 722598642,  # estimate
    "diffusion_pytorch_model.safetensors": 1445157124,  # estimate
    "images/control.png": 18562,  # estimate
    "images/image_out.png": 452116,  # estimate
    "images/input.png": 330208,  # estimate
}
CONTROLNET_SDXL_CANNY_FILES = {
    ".gitattributes": 1519,  # estimate
    "README.md": 4297,  # estimate
    "config.json": 1591,  # estimate (served: the tiny model's)
    "diffusion_pytorch_model.bin": 5004350205,  # estimate
    "diffusion_pytorch_model.fp16.safetensors": 2502139136,  # estimate
    "diffusion_pytorch_model.safetensors": 5004167864,  # estimate
    "out_hug_lab_7.png": 1226034,  # estimate
}
CONTROLNET_REPOS = {"lllyasviel/control_v11p_sd15_canny": ("sd1", CONTROLNET_SD15_CANNY_FILES),
                    "diffusers/controlnet-canny-sdxl-1.0": ("sdxl", CONTROLNET_SDXL_CANNY_FILES)}
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack", ".onnx", ".onnx_data", ".png")
PAGE_SIZE = 50  # the real Hub pages at 1000; small here so that the SDXL listing needs two pages


def real_repo(repo_id: str) -> dict:
    """{path: placeholder size} of a real repo, with its real model_index.json as bytes."""
    _, files, model_index = REAL_REPOS[repo_id]
    return {**files, "model_index.json": json.dumps(model_index, indent=2).encode()}


def tiny_pipeline_files(family: str) -> dict:
    """{path: bytes} of a tiny seeded diffusers pipeline (fp32 and fp16 weights), tokenizers in the
    hub's vocab.json/merges.txt layout; without model_index.json (the real repo's is served)."""
    folder = Path(tempfile.mkdtemp(prefix="sd_core_fake_hub_"))
    pipe = tiny.stable_diffusion(family)
    pipe.save_pretrained(folder)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and not p.parts[len(folder.parts)].startswith("tokenizer")}
    del files["model_index.json"]
    tokenizers = {"tokenizer": None, "tokenizer_2": "!"} if family == "sdxl" else {"tokenizer": None}
    for name, pad in tokenizers.items():
        files.update({f"{name}/{p.name}": p.read_bytes() for p in Path(tiny.tokenizer_folder(pad)).iterdir()})
    return files


def repo_with_tiny_pipeline(repo_id: str) -> dict:
    """The real layout, with the files a pipeline loads replaced by a tiny model's (same paths)."""
    repo = real_repo(repo_id)
    tiny_files = tiny_pipeline_files(REAL_REPOS[repo_id][0])
    unknown = sorted(set(tiny_files) - set(repo))
    assert not unknown, f"the tiny pipeline has files the real {repo_id} does not: {unknown}"
    return {**repo, **tiny_files}


def repo_with_tiny_controlnet(repo_id: str) -> dict:
    """A ControlNet repo's real layout, its config.json and safetensors weights (fp32 and fp16) those of a tiny
    seeded diffusers ControlNet of the repo's family (made from the tiny pipeline's UNet)."""
    import diffusers

    family, files = CONTROLNET_REPOS[repo_id]
    controlnet = diffusers.ControlNetModel.from_unet(tiny.stable_diffusion(family).unet,
                                                     conditioning_embedding_out_channels=(8, 16))
    torch.manual_seed(1)
    with torch.no_grad():  # weights that are not the UNet's or zero, so a wrong file would show
        for parameter in controlnet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    folder = Path(tempfile.mkdtemp(prefix="sd_core_fake_controlnet_"))
    controlnet.save_pretrained(folder)
    controlnet.to(torch.float16).save_pretrained(folder, variant="fp16")
    tiny_files = {p.name: p.read_bytes() for p in folder.iterdir()}
    unknown = sorted(set(tiny_files) - set(files))
    assert not unknown, f"the tiny ControlNet has files the real {repo_id} does not: {unknown}"
    return {**files, **tiny_files}


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class RepoFile:
    """One file: its bytes, or a placeholder size; git and LFS ids as the Hub reports them."""

    def __init__(self, path: str, content: bytes | int):
        self.path, self.content = path, content
        self.size = len(content) if isinstance(content, bytes) else content
        stand_in = content if isinstance(content, bytes) else f"{path}:{content}".encode()  # placeholders: stable ids
        self.is_lfs = path.endswith(LFS_SUFFIXES) or self.size >= 10 * 2**20
        self.sha256 = hashlib.sha256(stand_in).hexdigest() if self.is_lfs else None
        self.blob_id = git_blob_id(stand_in)

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return entry

    def sibling(self, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": self.path}
        lfs = {"sha256": self.sha256, "size": self.size, "pointerSize": 134} if self.is_lfs else None
        return {"rfilename": self.path, "size": self.size, "blobId": self.blob_id, **({"lfs": lfs} if lfs else {})}

    def chunks(self, start: int, chunk_size: int = 2**20):
        if isinstance(self.content, bytes):
            yield self.content[start:]
            return
        zeros = bytes(chunk_size)
        for offset in range(start, self.size, chunk_size):
            yield zeros[:min(chunk_size, self.size - offset)]


class FakeHub:
    """`with FakeHub({repo_id: {path: bytes or size}}) as hub:` serves them at `hub.url` on 127.0.0.1.
    `hub.downloads` lists (path, bytes sent) of every file body served; `hub.requests` every request."""

    def __init__(self, repos: dict, gated: tuple = ()):
        self.repos = {repo_id: {path: RepoFile(path, content) for path, content in sorted(files.items())}
                      for repo_id, files in repos.items()}
        self.commits = {repo_id: hashlib.sha1(repo_id.encode()).hexdigest() for repo_id in repos}
        self.gated = set(gated)
        self.downloads, self.requests = [], []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()

    @property
    def bytes_served(self) -> int:
        return sum(size for _, size in self.downloads)

    def handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.route(self, body=False)

            def do_GET(self):
                hub.route(self, body=True)

        return Handler

    # ------------------------------------------------------------------------------------------- routing

    def route(self, request, body: bool):
        url = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.lock:
            self.requests.append((request.command, unquote(url.path)))
        routes = [(r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self.tree),
                  (r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self.info),
                  (r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve)]
        for pattern, answer in routes:
            match = re.fullmatch(pattern, url.path)
            if match:
                parts = {k: unquote(v) if v else v for k, v in match.groupdict().items()}
                if parts["repo"] not in self.repos:
                    return self.error(request, 401, "RepoNotFound")
                if (parts.get("rev") or "main") not in ("main", self.commits[parts["repo"]]):
                    return self.error(request, 404, "RevisionNotFound")
                return answer(request, body, query, **parts)
        self.error(request, 404, None)

    def error(self, request, status: int, code: str | None, headers: dict = {}):
        request.send_response(status)
        for name, value in {**({"X-Error-Code": code} if code else {}), **headers, "Content-Length": "0"}.items():
            request.send_header(name, value)
        request.end_headers()

    def send_json(self, request, data, headers: dict = {}):
        payload = json.dumps(data).encode()
        request.send_response(200)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                            **headers}.items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(payload)

    def info(self, request, body, query, repo, rev):
        blobs = query.get("blobs") == "true"
        self.send_json(request, {"_id": self.commits[repo][:24], "id": repo, "modelId": repo,
                                 "sha": self.commits[repo], "private": False, "disabled": False,
                                 "gated": "manual" if repo in self.gated else False,
                                 "siblings": [f.sibling(blobs) for f in self.repos[repo].values()]})

    def tree(self, request, body, query, repo, rev, path):
        prefix = f"{path.strip('/')}/" if path else ""
        recursive = query.get("recursive") == "true"
        entries, folders = [], set()
        for file in self.repos[repo].values():
            if not file.path.startswith(prefix):
                continue
            parts = file.path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(file.tree_entry())
        entries += [{"type": "directory", "oid": git_blob_id(f.encode()), "size": 0, "path": f} for f in folders]
        entries.sort(key=lambda entry: entry["path"])
        start = int(query.get("cursor", 0))
        headers = {}
        if start + PAGE_SIZE < len(entries):
            next_query = (f"recursive={query.get('recursive', 'false')}&expand={query.get('expand', 'false')}"
                          f"&cursor={start + PAGE_SIZE}")
            headers["Link"] = f'<{self.url}{urlsplit(request.path).path}?{next_query}>; rel="next"'
        self.send_json(request, entries[start:start + PAGE_SIZE], headers)

    def resolve(self, request, body, query, repo, rev, path):
        commit = {"X-Repo-Commit": self.commits[repo]}
        if repo in self.gated:
            return self.error(request, 401, "GatedRepo", commit)
        file = self.repos[repo].get(path)
        if file is None:
            return self.error(request, 404, "EntryNotFound", commit)
        start = int(re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", "bytes=0-")).group(1))
        request.send_response(206 if start else 200)
        headers = {**commit, "ETag": f'"{file.blob_id}"', "Content-Length": str(file.size - start),
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if file.is_lfs:
            headers.update({"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size)})
        if start:
            headers["Content-Range"] = f"bytes {start}-{file.size - 1}/{file.size}"
        for name, value in headers.items():
            request.send_header(name, value)
        request.end_headers()
        if body:
            sent = 0
            for chunk in file.chunks(start):
                request.wfile.write(chunk)
                sent += len(chunk)
            with self.lock:
                self.downloads.append((path, sent))
