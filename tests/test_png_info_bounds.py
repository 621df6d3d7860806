"""PNG Info never holds the server: A1111 infotext parsed in linear time within a stated bound, only the PNG's
text chunks read (never its pixels), and hostile chunks answered in sd_core's words."""
import re
import struct
import zlib

import pytest

from sd_core.app import parts as app_parts


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(path, text_chunks=(), after_image=(), side=8, bits=8):
    """A PNG of side x side grey pixels (all black) with the given text chunks before and after its image data."""
    rows = zlib.compressobj(9)
    row = b"\0" * (1 + (side * bits + 7) // 8)
    pixels = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, bits, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + b"".join(text_chunks) + png_chunk(b"IDAT", pixels)
                     + b"".join(after_image) + png_chunk(b"IEND", b""))
    return path


def tEXt(key: str, text: str) -> bytes:
    return png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))


INFOTEXT = "a red circle\nNegative prompt: blur\nSteps: 7, Sampler: DDIM, CFG scale: 5, Seed: 3, Size: 64x64"
OLD_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's own, quadratic


def test_a1111_pairs_are_found_as_a1111_s_own_expression_finds_them():
    import random
    from sd_core.pipelines.metadata import A1111_PARAM
    draw = random.Random(0)
    for _ in range(20_000):
        line = "".join(draw.choice('ab :,"\\-/\t\u00e9\u00a0_1') for _ in range(draw.randint(0, 24)))
        assert A1111_PARAM.findall(line) == OLD_A1111_PARAM.findall(line), repr(line)


@pytest.mark.parametrize("last_line", ["a" * 120_000, "a " * 500_000, "Steps: 7, " + 'x: "' + "\\\"" * 500_000,
                                       "Steps: 7, Seed: 3, CFG scale: 5, Long: " + "b-" * 500_000])
def test_a_long_a1111_last_line_parses_in_well_under_a_second(last_line):
    import time
    from sd_core.pipelines.metadata import parse_a1111_parameters
    start = time.perf_counter()
    parse_a1111_parameters("a prompt\n" + last_line)  # A1111's expression: 66 s at 120 KB, ~75 min at 1 MB
    assert time.perf_counter() - start < 1.0


def test_a1111_text_beyond_the_bound_is_refused_naming_it():
    from sd_core.pipelines.metadata import MAX_PARAMETERS_BYTES, parse_a1111_parameters
    with pytest.raises(ValueError, match=f"characters long; sd_core reads at most {MAX_PARAMETERS_BYTES}"):
        parse_a1111_parameters("x" * (MAX_PARAMETERS_BYTES + 1))


def test_png_info_reads_a_176_mpx_png_s_parameters_without_decoding_it(tmp_path, monkeypatch):
    from PIL import ImageFile
    from sd_core.pipelines.metadata import read_png_parameters
    big = png_file(tmp_path / "big.png", [tEXt("parameters", INFOTEXT)], side=13_264, bits=1)  # 176 Mpx
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the pixels were decoded"))
    assert read_png_parameters(big).steps == 7
    after = png_file(tmp_path / "after.png", after_image=[tEXt("parameters", INFOTEXT)])  # text after the pixels
    assert read_png_parameters(after).seed == 3
    with open(after, "rb") as upload:
        assert read_png_parameters(upload).prompt == "a red circle"


def itxt(key: str, payload: bytes, compressed: bool) -> bytes:
    return png_chunk(b"iTXt", key.encode() + b"\0" + (b"\1\0" if compressed else b"\0\0") + b"en\0\0" + payload)


HOSTILE_PNGS = [  # (what, the chunks before the image data, the message expected)
    ("a zTXt chunk inflating to 100 MB", [png_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * 10 ** 8, 9))],
     "its 'parameters' text inflates beyond 2097152 bytes"),
    ("an iTXt chunk inflating to 100 MB", [itxt("parameters", zlib.compress(b"a" * 10 ** 8, 9), True)],
     "inflates beyond 2097152 bytes"),
    ("a compressed chunk that does not inflate", [itxt("parameters", b"not zlib", True)], "does not inflate"),
    ("an iTXt chunk not in UTF-8", [itxt("parameters", b"\xff\xfe", False)], "is not UTF-8"),
    ("a 4 MB text chunk", [tEXt("parameters", "a" * 4 * 2 ** 20)], "sd_core reads PNG text chunks of at most 2097152"),
    ("a text chunk failing its checksum", [tEXt("parameters", INFOTEXT)[:-4] + b"\0\0\0\0"], "fails its checksum"),
    ("a chunk claiming 4 GB", [struct.pack(">I", 2 ** 32 - 1) + b"zzZz"], "a chunk claims 4294967295 bytes"),
    ("Steps that are not a number", [tEXt("parameters", INFOTEXT.replace("Steps: 7", "Steps: seven"))],
     "steps must be a whole number from 1 to .*; got the text 'seven'"),
    ("a seed of 1e400", [tEXt("parameters", INFOTEXT.replace("Seed: 3", "Seed: 1e400"))], "seed must be a whole number .*not a finite number"),
    ("a size that is not WxH", [tEXt("parameters", INFOTEXT.replace("64x64", "64x64x64"))], "not WIDTHxHEIGHT"),
    ("A1111 text without its numbers", [tEXt("parameters", "just a prompt")], "has no Steps, CFG scale, Seed"),
    ("sd_core text that is not JSON", [tEXt("sd_core", "{not json")], "settings text is damaged \\(it is not JSON"),
    ("sd_core JSON nested 10^5 deep", [tEXt("sd_core", "[" * 100_000)], "it is not JSON"),
    ("sd_core JSON without a prompt", [tEXt("sd_core", '{"seed": 1}')], "it lacks 'prompt'"),
    ("a Clip skip that is not a number", [tEXt("parameters", INFOTEXT + ", Clip skip: two")], "Clip skip is 'two'"),
    ("sd_core JSON of the wrong shape", [tEXt("sd_core", "[1, 2]")], "a field has the wrong type"),
]


@pytest.mark.parametrize("what, chunks, message", HOSTILE_PNGS, ids=[case[0] for case in HOSTILE_PNGS])
def test_a_hostile_png_text_chunk_is_answered_in_sd_core_s_words(tmp_path, what, chunks, message):
    note = png_info_note(png_file(tmp_path / "upload.png", chunks))
    assert re.search(message, note) and "The form keeps its values" in note, note
    assert str(tmp_path) not in note


def png_info_note(path) -> str:
    """What PNG Info tells the visitor about `path` (its note beside the form, as text)."""
    import html
    return html.unescape(app_parts.png_info(str(path))[-1])


def test_png_info_says_plainly_what_is_not_a_png(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"\xff\xd8\xff\xe0 a JPEG")
    assert png_info_note(tmp_path / "photo.png").startswith("photo.png is not a PNG image")
