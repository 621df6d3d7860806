"""AUTOMATIC1111's prompt syntax: attention weights, BREAK, prompts longer than 77 tokens, and clip_skip.

Opt-in. sd_core's default text conditioning is diffusers': one 77-token window, the rest truncated,
brackets read as text. Here a prompt is encoded as stable-diffusion-webui encodes it
(modules/prompt_parser.py `parse_prompt_attention`, modules/sd_hijack_clip.py `tokenize_line` and
`process_tokens`, modules/sd_emphasis.py `EmphasisOriginal`):

1. `parse_prompt_attention`: "(word)" x1.1, "[word]" /1.1, "(word:1.3)" x1.3, nesting multiplies,
   "\\(" is a literal bracket, "BREAK" ends a chunk.
2. `chunk_prompt`: each fragment is tokenized on its own and its weight given to each of its tokens;
   the tokens are cut into chunks of 75, moving the words after a comma to the next chunk when that
   comma lies within the last 20 tokens of a full chunk.
3. Every chunk becomes BOS + tokens + EOS, padded to 77 with the tokenizer's pad token, and goes through
   the text encoder on its own.
4. `emphasize`: each token's hidden state is multiplied by its weight, then the chunk is rescaled so its
   mean is the unweighted mean again.
5. The chunks are concatenated along the sequence: (batch, 77 * chunks, dim). Prompts encoded together
   (a negative and a positive prompt) are padded to the same number of chunks with empty chunks.

`clip_skip` counts as diffusers counts it: 0 uses the text encoder's usual layer, 1 the one before it.
"""
import re

import torch

from sd_core.models.clip import CLIPTextModelWithProjection

CHUNK_LENGTH = 75  # tokens per chunk, BOS and EOS not counted
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`; 0 never moves words
ROUND_BRACKET_WEIGHT = 1.1
SQUARE_BRACKET_WEIGHT = 1 / 1.1
# A chunk break in the output of `parse_prompt_attention`: the only fragment whose weight is None.
BREAK = ("BREAK", None)

# One piece of the syntax per match: an escaped character, a lone backslash, an opening bracket,
# ":<weight>)", a closing bracket, a run of plain text, or a ":" that starts no weight.
ATTENTION_SYNTAX = re.compile(r"""
    \\[()\[\]\\]              # \( \) \[ \] \\ : the character itself
  | \\                        # a lone backslash: nothing
  | [(\[]
  | :([+-]?[.\d]+)\)          # closes a round bracket with an explicit weight
  | [)\]]
  | [^\\()\[\]:]+
  | :
""", re.VERBOSE)
BREAK_KEYWORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float | None]]:
    """A1111's attention syntax -> [(text, weight), ...], runs of equal weight merged; `BREAK` marks a chunk break.

    "(a)" multiplies a's weight by 1.1, "[a]" divides it by 1.1, "(a:1.3)" multiplies it by 1.3; nested
    brackets multiply. "\\(", "\\)", "\\[", "\\]", "\\\\" are the literal characters. A bracket never closed
    applies to the end of the prompt; a closing bracket never opened is text. The word BREAK (upper
    case, on its own) in plain text ends a chunk.

    One deliberate difference: A1111 lets brackets multiply its break marker (text "BREAK", weight -1),
    so "(a BREAK b)" there encodes the word "break" with weight -1.1. Here BREAK is a break wherever it is.
    """
    fragments: list[list] = []  # [text, weight] pairs, mutable while brackets close
    open_round, open_square = [], []

    def multiply_from(start: int, factor: float):
        for fragment in fragments[start:]:
            if fragment[1] is not None:
                fragment[1] *= factor

    for match in ATTENTION_SYNTAX.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            fragments.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(fragments))
        elif piece == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), parse_weight(weight, text))
        elif piece == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_WEIGHT)
        elif piece == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_BRACKET_WEIGHT)
        else:
            for i, part in enumerate(BREAK_KEYWORD.split(piece)):
                if i:
                    fragments.append(list(BREAK))
                fragments.append([part, 1.0])
    for start in open_round:
        multiply_from(start, ROUND_BRACKET_WEIGHT)
    for start in open_square:
        multiply_from(start, SQUARE_BRACKET_WEIGHT)
    return merge_equal_weights(fragments or [["", 1.0]])


def parse_weight(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"The attention weight {weight!r} in {text!r} is not a number; write e.g. (word:1.3), "
                         f"or escape the brackets as \\( \\) to keep them as text.") from None


def merge_equal_weights(fragments: list[list]) -> list[tuple[str, float | None]]:
    merged = [list(fragments[0])]
    for text, weight in fragments[1:]:
        if weight == merged[-1][1]:  # a BREAK (None) is never next to another
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def chunk_prompt(tokenizer, prompt: str, comma_backtrack: int = COMMA_BACKTRACK) -> list[tuple[list, list]]:
    """The prompt's token ids and per-token weights, cut into chunks of at most 75 tokens (no BOS/EOS).

    A1111's `tokenize_line`: when a chunk is full and the next token is not a comma, the tokens after the
    chunk's last comma move to the next chunk if that comma is among its last `comma_backtrack` tokens.
    BREAK closes the chunk, even an empty one. An empty prompt is one empty chunk.
    """
    comma = tokenizer.vocab.get(",</w>")
    chunks = []
    ids, weights, last_comma = [], [], -1
    for text, weight in parse_prompt_attention(prompt):
        if weight is None:
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        for token in tokenizer.tokenize(text):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_LENGTH and last_comma != -1 and CHUNK_LENGTH - last_comma <= comma_backtrack:
                cut = last_comma + 1
                chunks.append((ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == CHUNK_LENGTH:
                chunks.append((ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def count_chunks(tokenizer, prompts: list[str], comma_backtrack: int = COMMA_BACKTRACK) -> int:
    """How many 77-token chunks the longest of `prompts` needs."""
    return max(len(chunk_prompt(tokenizer, prompt, comma_backtrack)) for prompt in prompts)


def chunk_inputs(tokenizer, chunks: list[tuple[list, list]], num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_chunks, 77) token ids and weights: BOS + tokens + EOS + the tokenizer's pad token per chunk (as
    A1111's `process_tokens` pads: EOS for CLIP-L, id 0 for OpenCLIP), weight 1 outside the prompt's
    tokens; chunks past the prompt's own are empty (A1111's `empty_chunk`)."""
    if len(chunks) > num_chunks:
        raise ValueError(f"The prompt needs {len(chunks)} chunks but num_chunks={num_chunks}; pass at least "
                         f"count_chunks(...) for all the prompts encoded together.")
    chunks = chunks + [([], [])] * (num_chunks - len(chunks))
    ids = tokenizer.pad([tokens for tokens, _ in chunks], CHUNK_LENGTH + 2)
    weights = torch.ones(ids.shape)
    for row, (_, chunk_weights) in enumerate(chunks):
        weights[row, 1:1 + len(chunk_weights)] = torch.tensor(chunk_weights, dtype=torch.float32)
    return ids, weights


def emphasize(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on (B, 77, dim) states of one chunk: z * weight per token, then
    z *= mean(unweighted z) / mean(weighted z), each prompt's mean on its own (A1111 takes the mean over
    the batch it encodes together, which is one prompt in its usual use). Computed in float32."""
    z = hidden_states.float()
    weighted = z * weights.to(z.device)[..., None]
    restore = z.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)
    return (weighted * restore).to(hidden_states.dtype)


def conditioning_states(text_encoder, input_ids: torch.Tensor, clip_skip: int, penultimate: bool):
    """(hidden states, pooled output) of one chunk, with diffusers' clip_skip.

    SD 1.x/2.x (`penultimate=False`): the output of layer -(clip_skip + 1) through the final LayerNorm, so
    clip_skip=0 is the last hidden state. SDXL (`penultimate=True`): hidden_states[-(clip_skip + 2)], no
    LayerNorm. (SD 2.x's config already stops one layer early, so its clip_skip=0 is OpenCLIP's penultimate.)
    """
    transformer = getattr(text_encoder, "text_model", text_encoder)
    num_layers, offset = len(transformer.encoder.layers), 2 if penultimate else 1
    if not isinstance(clip_skip, int) or not 0 <= clip_skip <= num_layers - offset:
        raise ValueError(f"clip_skip={clip_skip!r} must be an integer in [0, {num_layers - offset}] for this "
                         f"{num_layers}-layer text encoder (at least one of its layers has to remain).")
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + offset)]
    return (hidden if penultimate else transformer.final_layer_norm(hidden)), out.pooled_output


def encode_chunked(tokenizer, text_encoder, prompts: list[str], num_chunks: int, clip_skip: int, penultimate: bool,
                   comma_backtrack: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, 77 * num_chunks, dim) emphasized states, (B, ...) pooled output of each prompt's first chunk)."""
    device = next(text_encoder.parameters()).device
    inputs = [chunk_inputs(tokenizer, chunk_prompt(tokenizer, p, comma_backtrack), num_chunks) for p in prompts]
    ids, weights = torch.stack([i for i, _ in inputs]), torch.stack([w for _, w in inputs])  # (B, chunks, 77)
    outputs = [conditioning_states(text_encoder, ids[:, chunk].to(device), clip_skip, penultimate)
               for chunk in range(num_chunks)]
    states = [emphasize(hidden, weights[:, chunk]) for chunk, (hidden, _) in enumerate(outputs)]
    return torch.cat(states, dim=1), outputs[0][1]


def as_prompt_list(prompt: str | list[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"Pass a prompt string or a non-empty list of them; got {prompt!r}.")
    return prompts


def encode_weighted_prompt(tokenizer, text_encoder, prompt: str | list[str], clip_skip: int = 0,
                           num_chunks: int | None = None, comma_backtrack: int = COMMA_BACKTRACK) -> torch.Tensor:
    """SD 1.x/2.x conditioning of prompts in A1111's syntax: (B, 77 * chunks, dim).

    All prompts of one call are padded to the same number of chunks (at least `num_chunks`), so encode a
    negative and a positive prompt together, or pass each the same `num_chunks` (see `count_chunks`).
    With plain text of at most 75 tokens and clip_skip=0 this is exactly the usual last hidden state.
    """
    prompts = as_prompt_list(prompt)
    num_chunks = max(num_chunks or 1, count_chunks(tokenizer, prompts, comma_backtrack))
    return encode_chunked(tokenizer, text_encoder, prompts, num_chunks, clip_skip, False, comma_backtrack)[0]


def encode_weighted_prompt_sdxl(tokenizers: list, text_encoders: list, prompt: str | list[str], clip_skip: int = 0,
                                num_chunks: int | None = None, comma_backtrack: int = COMMA_BACKTRACK):
    """SDXL conditioning of prompts in A1111's syntax: ((B, 77 * chunks, sum of dims), pooled (B, projection)).

    Each encoder's penultimate states (diffusers' SDXL clip_skip) are emphasized on their own and
    concatenated along the feature axis (768 + 1280 = 2048 for the base model, the encoder 2 alone for the
    refiner). The pooled output is the projected encoder's on each prompt's first chunk, as A1111 and
    ComfyUI take it. Chunk counts are shared by both encoders and all prompts, as in `encode_weighted_prompt`.
    """
    prompts = as_prompt_list(prompt)
    if not any(isinstance(encoder, CLIPTextModelWithProjection) for encoder in text_encoders):
        raise ValueError("SDXL needs its projected text encoder (CLIPTextModelWithProjection, text_encoder_2) for the "
                         "pooled embedding; pass it last in text_encoders.")
    num_chunks = max([num_chunks or 1] + [count_chunks(t, prompts, comma_backtrack) for t in tokenizers])
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        encoded, encoder_pooled = encode_chunked(tokenizer, encoder, prompts, num_chunks, clip_skip, True,
                                                 comma_backtrack)
        states.append(encoded)
        if isinstance(encoder, CLIPTextModelWithProjection):
            pooled = encoder_pooled
    return torch.cat(states, dim=-1), pooled
