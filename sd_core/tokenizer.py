"""CLIP's byte-level BPE tokenizer, written to give the same ids as transformers' `CLIPTokenizer`.

Steps: split out special tokens, normalise (NFC, collapse whitespace, lower-case), pre-split with
CLIP's regex, map bytes to printable unicode, apply BPE merges with `</w>` marking a word's end,
then add BOS/EOS, truncate and pad to 77.

Deliberate difference from OpenAI's original tokenizer: it also runs `ftfy.fix_text` and
`html.unescape`; transformers (and so diffusers) do not, and neither do we, so "&amp;" stays as is.
"""
import functools
import gzip
import heapq
import json
import unicodedata
from pathlib import Path

import regex
import torch

DEFAULT_VOCABULARY = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-split: contractions, letter runs, single digits, runs of other non-space characters.
PRE_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 2 x 256 byte symbols (with/without </w>), merges, 2 specials
# The BPE of a word is cached, but only for words a prompt really repeats: at most CACHED_WORDS of them (least
# recently used dropped first), each at most CACHED_WORD_LENGTH symbols. A 100,000-letter word is tokenized (in
# O(n log n)) and forgotten, so no visitor can grow the cache without bound.
CACHED_WORDS, CACHED_WORD_LENGTH = 10_000, 64


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Insertion order matters: CLIP's vocabulary lists the printable bytes first, then the others.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(unprintable)})
    return mapping


@functools.lru_cache()
def shipped_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary from the shipped BPE merges: bytes, bytes + </w>, merged symbols, BOS, EOS."""
    with gzip.open(DEFAULT_VOCABULARY, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {s: i for i, s in enumerate(symbols)}, merges


def read_vocabulary(folder: str | Path | None) -> tuple[dict[str, int], list[tuple[str, str]], dict]:
    """(vocab, merges, tokenizer settings) from a diffusers `tokenizer/` folder, or CLIP's shipped BPE file."""
    if folder is None:
        return *shipped_vocabulary(), {}
    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    elif (folder / "tokenizer.json").is_file():  # what transformers 5 writes
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        vocab = model["vocab"]
        merges = [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
    else:
        raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder: it needs vocab.json and merges.txt "
                                f"(or a tokenizer.json).")
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
    return vocab, merges, settings


def normalize(text: str) -> str:
    """NFC, runs of whitespace collapsed to one space, lower-cased."""
    normalized = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text))
    # Lower-case character by character: Python alone would turn a word-final Σ into ς.
    return normalized.replace("Σ", "σ").lower()


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
    """`tokenizer(["a prompt", ...])` -> (B, 77) LongTensor of ids: BOS, tokens, EOS, then padding.

    The pad token is read from the folder's config: SD1's CLIP-L pads with `<|endoftext|>`, the OpenCLIP
    tokenizers of SD2 and SDXL pad with `!` (id 0).
    """

    def __init__(self, folder: str | Path | None = None, pad_token: str | None = None, model_max_length: int = 77):
        self.vocab, merges, settings = read_vocabulary(folder)
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.merges = list(merges)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        length = settings.get("model_max_length", model_max_length)
        # transformers writes int(1e30) ("unknown") when no length was set: then CLIP's own 77
        known = isinstance(length, (int, float)) and not isinstance(length, bool) and 2 < length <= 4096
        self.model_max_length = int(length) if known else model_max_length
        self.pad_token = pad_token or _token_text(settings.get("pad_token")) or EOS
        for token in (BOS, EOS, self.pad_token):
            if token not in self.vocab:
                raise ValueError(f"Special token {token!r} is not in the vocabulary.")
        self.bos_token_id, self.eos_token_id = self.vocab[BOS], self.vocab[EOS]
        self.pad_token_id = self.vocab[self.pad_token]
        # Special tokens are cut out of the raw text before normalisation, longest first (as transformers does).
        specials = sorted({BOS, EOS, self.pad_token}, key=len, reverse=True)
        self.special_split = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        # Added tokens (textual inversion): normalised text -> ids, matched in the normalised prompt before BPE.
        self.added_tokens: dict[str, list[int]] = {}
        self.added_split = None
        self._bpe_cached = functools.lru_cache(maxsize=CACHED_WORDS)(self._bpe_uncached)

    def add_token(self, text: str, count: int = 1) -> list[int]:
        """Add `text` as a new token, or as `count` tokens named `text`, `text_1`, ... (diffusers' names for the
        vectors of a multi-vector textual-inversion embedding); returns their ids, appended after the vocabulary.

        Like transformers' added tokens, they are found in the normalised (lower-cased) prompt before BPE, even
        inside a word, longest first; `text` stands for all `count` ids, as diffusers' `maybe_convert_prompt` makes it.
        """
        names = [text] + [f"{text}_{i}" for i in range(1, count)]
        taken = [name for name in names if name in self.vocab or normalize(name) in self.added_tokens]
        if taken:
            raise ValueError(f"Token(s) {taken} are already in the vocabulary; bind the embedding to another token.")
        ids = list(range(len(self.vocab), len(self.vocab) + count))
        for name, token_id in zip(names, ids):
            self.vocab[name], self.id_to_token[token_id] = token_id, name
            self.added_tokens[normalize(name)] = [token_id]
        self.added_tokens[normalize(text)] = ids
        longest_first = sorted(self.added_tokens, key=len, reverse=True)
        self.added_split = regex.compile("(" + "|".join(regex.escape(t) for t in longest_first) + ")")
        return ids

    def _bpe(self, word: str) -> tuple[str, ...]:
        return self._bpe_cached(word) if len(word) <= CACHED_WORD_LENGTH else self._bpe_uncached(word)

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        """BPE as CLIP (and transformers) define it: repeatedly take the pair of adjacent symbols with the lowest
        merge rank and merge every occurrence of it, left to right; stop when no adjacent pair has a rank.

        The same merges, found with a heap of (rank, position) over a linked list of symbols instead of a rescan
        of the whole word per merge: O(n log n) rather than O(n^2), so a word of any length ends in bounded time.
        """
        symbols: list[str | None] = [*word[:-1], word[-1] + "</w>"]
        after = [*range(1, len(symbols)), -1]  # the next live symbol's position, -1 at the end
        before = list(range(-1, len(symbols) - 1))
        rank_of = self.merge_rank.get
        heap = [(rank, i) for i, pair in enumerate(zip(symbols, symbols[1:])) if (rank := rank_of(pair)) is not None]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            first, second = self.merges[rank]
            positions = []
            while heap and heap[0][0] == rank:  # every occurrence of this pair (some stale), in order
                positions.append(heapq.heappop(heap)[1])
            merged = []
            for i in positions:
                j = after[i]
                if j == -1 or symbols[i] != first or symbols[j] != second:
                    continue  # stale: already merged into another symbol this pass or before
                symbols[i], symbols[j] = first + second, None
                after[i] = after[j]
                if after[j] != -1:
                    before[after[j]] = i
                merged.append(i)
            # New pairs around the merged symbols; a merge never recreates its own pair, so none has rank `rank`.
            for left in {left for i in merged for left in (before[i], i) if left != -1}:
                right = after[left]
                if right != -1 and (new_rank := rank_of((symbols[left], symbols[right]))) is not None:
                    heapq.heappush(heap, (new_rank, left))
        return tuple(symbol for symbol in symbols if symbol is not None)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS, truncation or padding."""
        if not isinstance(text, str):
            raise TypeError(f"Prompts must be strings; got {type(text).__name__}.")
        ids = []
        for segment in self.special_split.split(text):
            if segment in self.vocab and self.special_split.fullmatch(segment):
                ids.append(self.vocab[segment])
                continue
            pieces = self.added_split.split(normalize(segment)) if self.added_split else [normalize(segment)]
            for piece in pieces:
                if piece in self.added_tokens:
                    ids.extend(self.added_tokens[piece])
                    continue
                for word in PRE_SPLIT.findall(piece):
                    word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                    ids.extend(self.vocab[symbol] for symbol in self._bpe(word))
        return ids

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """BOS + ids + EOS, truncated to `max_length` (default 77), not padded."""
        return self.with_specials(self.tokenize(text), max_length or self.model_max_length)

    def with_specials(self, tokens: list[int], max_length: int) -> list[int]:
        return [self.bos_token_id, *tokens[:max_length - 2], self.eos_token_id]

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.pad([self.tokenize(t) for t in texts], max_length)

    def pad(self, token_lists: list[list[int]], max_length: int | None = None) -> torch.Tensor:
        """(B, max_length) ids: BOS, the tokens truncated to fit, EOS, then the pad token."""
        max_length = max_length or self.model_max_length
        rows = [self.with_specials(tokens, max_length) for tokens in token_lists]
        return torch.tensor([row + [self.pad_token_id] * (max_length - len(row)) for row in rows], dtype=torch.long)

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens dropped; words end where a `</w>` symbol did."""
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        text = "".join(self.id_to_token[int(i)] for i in ids if int(i) not in specials)
        text = text.replace("</w>", self.byte_encoder[ord(" ")])
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").strip()

    def save(self, folder: str | Path):
        """Write vocab.json, merges.txt and the configs of a diffusers `tokenizer/` folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        merges = sorted(self.merge_rank, key=self.merge_rank.get)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                           encoding="utf-8")
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        config = {**special, "model_max_length": self.model_max_length, "tokenizer_class": "CLIPTokenizer",
                  "do_lower_case": True, "errors": "replace", "add_prefix_space": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
