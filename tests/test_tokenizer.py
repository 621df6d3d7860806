import pytest
import transformers

from sd_core.tokenizer import CLIPTokenizer

CORPUS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "Hello, World!!! 123 4567 -- don't, it's, we'll, they'd, I'm, you're, we've",
    "café naïve résumé Ångström crème brûlée",
    "🙂🚀 emoji 👩‍👩‍👧 and ☃",
    "  lots   of\tspaces\nand a newline  ",
    "punctuation: (brackets) [square] {curly} <angle> ... ?! #hash @at $5.99 50% a/b a\\b a_b",
    "a <|endoftext|> b <|startoftext|>",
    "A <|ENDOFTEXT|> b",
    "&amp; &lt;html&gt; entities stay as text",
    "x" * 300,
    " ".join(["word"] * 100),
    "İstanbul ß ΣΑΣ ΟΔΥΣΣΕΥΣ",
    "ｆｕｌｌ width ＡＢＣ and e\u0301 combining accent",
    "日本語のテキスト 中文 한국어 العربية",
    "UPPER lower MiXeD 3D 4k 8K",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """sd_core tokenizers and transformers' CLIPTokenizer reading the same folders, per family."""
    pairs = {}
    for family, pad in [("sd1_clip_l", None), ("sd2_openclip", "!")]:
        ours = CLIPTokenizer(pad_token=pad)
        folder = tmp_path_factory.mktemp(family)
        ours.save(folder)
        pairs[family] = (CLIPTokenizer(folder), transformers.CLIPTokenizer.from_pretrained(folder))
    return pairs


@pytest.mark.parametrize("family", ["sd1_clip_l", "sd2_openclip"])
def test_token_ids_equal_transformers_on_varied_corpus(tokenizers, family):
    ours, reference = tokenizers[family]
    expected = reference(CORPUS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours(CORPUS).tolist() == expected


def test_known_clip_ids_for_a_simple_prompt(tokenizers):
    ours, _ = tokenizers["sd1_clip_l"]
    assert ours.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_l_pads_with_endoftext_and_openclip_pads_with_exclamation_id_0(tokenizers):
    sd1, _ = tokenizers["sd1_clip_l"]
    sd2, _ = tokenizers["sd2_openclip"]
    assert sd1("a cat")[0, -1].item() == 49407 and sd1.pad_token == "<|endoftext|>"
    assert sd2("a cat")[0, -1].item() == 0 and sd2.pad_token == "!"
    assert sd2("a cat")[0, :4].tolist() == [49406, 320, 2368, 49407]


def test_long_prompt_is_truncated_to_77_keeping_bos_and_eos(tokenizers):
    ours, _ = tokenizers["sd1_clip_l"]
    ids = ours(" ".join(["word"] * 100))[0]
    assert ids.shape == (77,) and ids[0].item() == 49406 and ids[-1].item() == 49407
    assert len(ours.tokenize(" ".join(["word"] * 100))) == 100


def test_html_entities_are_not_unescaped_deliberately(tokenizers):
    """OpenAI's original tokenizer unescapes HTML; transformers (the reference) does not, nor do we."""
    ours, _ = tokenizers["sd1_clip_l"]
    assert ours.tokenize("&amp;") != ours.tokenize("&")


def test_shipped_vocabulary_equals_the_saved_folder(tokenizers):
    ours, _ = tokenizers["sd1_clip_l"]
    shipped = CLIPTokenizer()
    assert shipped.vocab == ours.vocab and shipped.merge_rank == ours.merge_rank


def test_decode_inverts_tokenize(tokenizers):
    ours, _ = tokenizers["sd1_clip_l"]
    assert ours.decode(ours("a red circle, on the left!")[0]) == "a red circle , on the left !"


def test_bad_input_gives_clear_errors(tmp_path, tokenizers):
    ours, _ = tokenizers["sd1_clip_l"]
    with pytest.raises(TypeError, match="must be strings"):
        ours([3])
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer(tmp_path)
