import json

import numpy as np
import pytest
from PIL import Image

from sd_core.__main__ import main
from tests import tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    sd = tiny.save_pretrained(tiny.stable_diffusion("sd1", seed=1), tmp_path_factory.mktemp("sd1"))
    dit = tiny.save_pretrained(tiny.dit(seed=2), tmp_path_factory.mktemp("dit"))
    return sd, dit


def test_generate_writes_images_with_metadata_and_prints_the_seed(folders, tmp_path, capsys):
    sd, _ = folders
    out = tmp_path / "cat.png"
    assert main(["generate", "--model", str(sd), "a cat", "--steps", "3", "--seed", "5", "--height", "16",
                 "--width", "24", "--batch", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seed 5" in printed
    for k, path in enumerate((tmp_path / "cat-0.png", tmp_path / "cat-1.png")):
        image = Image.open(path)
        assert image.size == (24, 16) and json.loads(image.text["sd_core"])["seed"] == 5 + k  # A1111's batch rule


def test_generate_is_reproducible_and_supports_image_to_image(folders, tmp_path):
    sd, _ = folders
    for name in ("a.png", "b.png"):
        main(["generate", "--model", str(sd), "a dog", "--steps", "2", "--seed", "9", "--height", "16", "--width",
              "16", "-o", str(tmp_path / name)])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert main(["generate", "--model", str(sd), "a dog", "--init-image", str(tmp_path / "a.png"), "--strength",
                 "0.5", "--steps", "4", "--seed", "1", "-o", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size == (16, 16)


def test_vae_and_dit_commands(folders, tmp_path, capsys):
    sd, dit = folders
    Image.new("RGB", (20, 12), (200, 30, 30)).save(tmp_path / "in.png")
    assert main(["vae", "--model", str(sd), str(tmp_path / "in.png"), "-o", str(tmp_path / "rec.png")]) == 0
    assert "PSNR" in capsys.readouterr().out and Image.open(tmp_path / "rec.png").size == (20, 12)
    assert main(["dit", "--model", str(dit), "class 2", "7", "--steps", "3", "--guidance", "1", "--seed", "0",
                 "-o", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d-0.png").is_file() and (tmp_path / "d-1.png").is_file()
    assert main(["dit", "red circle", "--steps", "4", "--seed", "0", "--dit-cache", "2", "-o", str(tmp_path / "f.png")]) == 0
    recorded = json.loads(Image.open(tmp_path / "f.png").info["sd_core"])
    assert "dit_cache=2" in recorded["fast"] and recorded["dit_cache"] == 2


def test_cli_errors_are_one_line_and_exit_2(folders, tmp_path, capsys):
    sd, dit = folders
    assert main(["generate", "--model", str(sd), "x", "-o", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(sd), "x", "--height", "99", "--steps", "1", "-o",
                 str(tmp_path / "x.png")]) == 2
    assert "height must be a positive multiple" in capsys.readouterr().err
    assert main(["dit", "--model", str(sd), "3", "-o", str(tmp_path / "x.png")]) == 2
    assert "needs a DiT model" in capsys.readouterr().err
    assert main(["dit", "--model", str(dit), "unicorn", "-o", str(tmp_path / "x.png")]) == 2
    assert "Unknown class label" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def settings_of(path) -> dict:
    return json.loads(Image.open(path).text["sd_core"])


def test_defaults_by_door_outputs_folder_and_jpeg(folders, tmp_path, monkeypatch, capsys):
    sd, dit = folders
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", str(sd), "a cat", "--seed", "1", "--height", "16", "--width", "16"]) == 0
    written = sorted((tmp_path / "outputs").iterdir())
    assert [p.name for p in written] == ["generate-00000.png"]
    settings = settings_of(written[0])  # not in the catalog: the family's recommended settings
    assert (settings["steps"], settings["guidance_scale"], settings["model"]) == (30, 7.5, sd.name)
    assert main(["dit", "--model", str(dit), "--class", "class 1", "--count", "2", "--seed", "3"]) == 0
    assert settings_of(tmp_path / "outputs" / "dit-00000-1.png")["class_labels"] == [1, 1]
    assert settings_of(tmp_path / "outputs" / "dit-00000-1.png")["seed"] == 4
    assert main(["generate", "--model", str(sd), "a cat", "--steps", "1", "--height", "16", "--width", "16",
                 "-o", "outputs/x.jpg"]) == 0
    assert Image.open(tmp_path / "outputs" / "x.jpg").format == "JPEG"
    assert "only PNG files keep the generation parameters" in capsys.readouterr().out


def test_embedded_models_default_to_their_catalog_settings(tmp_path):
    from sd_core.checkpoints.catalog import EMBEDDED_DIT_GUIDANCE, EMBEDDED_GUIDANCE, EMBEDDED_STEPS
    assert main(["generate", "a big red circle on the left on a gray background", "--seed", "0",
                 "-o", str(tmp_path / "e.png")]) == 0
    settings = settings_of(tmp_path / "e.png")
    assert (settings["steps"], settings["guidance_scale"]) == (EMBEDDED_STEPS, EMBEDDED_GUIDANCE)
    assert settings["model"] == "embedded: shapes (text to image)"
    assert main(["dit", "--class", "red circle", "--steps", "2", "-o", str(tmp_path / "d.png")]) == 0
    assert settings_of(tmp_path / "d.png")["guidance_scale"] == EMBEDDED_DIT_GUIDANCE


def test_prompt_syntax_clip_skip_lora_and_embedding_options(folders, tmp_path, capsys):
    import safetensors.torch
    import torch
    sd, _ = folders
    common = ["--model", str(sd), "--steps", "2", "--seed", "3", "--height", "16", "--width", "16"]
    assert main(["generate", "a (cat:1.4)", *common, "--prompt-syntax", "a1111", "--clip-skip", "1",
                 "-o", str(tmp_path / "a.png")]) == 0
    settings = settings_of(tmp_path / "a.png")
    assert settings["prompt_syntax"] == "a1111" and settings["clip_skip"] == 1
    conv_in = tiny.stable_diffusion("sd1", seed=1).unet.conv_in
    lora = {"lora_unet_conv_in.lora_down.weight": torch.randn(2, *conv_in.weight.shape[1:]),
            "lora_unet_conv_in.lora_up.weight": torch.randn(conv_in.weight.shape[0], 2, 1, 1)}
    safetensors.torch.save_file(lora, tmp_path / "style.safetensors")
    width = tiny.stable_diffusion("sd1", seed=1).text_encoder.config.hidden_size
    safetensors.torch.save_file({"emb_params": torch.randn(2, width)}, tmp_path / "sdcoretoy.safetensors")
    capsys.readouterr()
    assert main(["generate", "a sdcoretoy cat", *common, "--lora", f"{tmp_path / 'style.safetensors'}:0.7", "--embedding",
                 str(tmp_path / "sdcoretoy.safetensors"), "-o", str(tmp_path / "b.png")]) == 0
    assert "embedding tokens: sdcoretoy" in capsys.readouterr().out
    assert main(["generate", "a sdcoretoy cat", *common, "-o", str(tmp_path / "c.png")]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(Image.open(tmp_path / "c.png")))


@pytest.mark.parametrize("argv,message", [
    (["--lora", "style.safetensors"], "--lora takes FILE:SCALE"),
    (["--lora", "style.safetensors:strong"], "--lora takes FILE:SCALE"),
    (["--guidance", "inf"], "must be a finite number"),
    (["--guidance", "nan"], "must be a finite number"),
])
def test_bad_option_values_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_zero_width_and_a_folder_as_output_are_clear_errors(folders, tmp_path, capsys):
    sd, _ = folders
    assert main(["generate", "--model", str(sd), "x", "--width", "0", "-o", str(tmp_path / "x.png")]) == 2
    assert "width must be a whole number from 8 to 4096; got 0" in capsys.readouterr().err
    assert main(["generate", "--model", str(sd), "x", "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_generate_inpaints_with_a_mask_and_refines_with_an_sdxl_refiner(folders, tmp_path, capsys):
    from sd_core.checkpoints.loading import load_pipeline
    from sd_core.pipelines.generate import inpaint, refine
    sd, _ = folders
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[4:12, 8:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["generate", "--model", str(sd), "a cat", "--init-image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "3", "--seed", "4", "--guidance", "3", "--scheduler", "ddim",
                 "-o", str(tmp_path / "painted.png")]) == 0
    expected = inpaint(load_pipeline(sd), tmp_path / "in.png", tmp_path / "mask.png", "a cat", steps=3, seed=4,
                       guidance_scale=3.0, scheduler="ddim").images[0]
    painted = Image.open(tmp_path / "painted.png")
    assert np.array_equal(np.asarray(painted), np.asarray(expected))
    assert json.loads(painted.text["sd_core"])["inpaint"] is True and json.loads(painted.text["sd_core"])["strength"] == 1.0

    base = tiny.save_pretrained(tiny.stable_diffusion("sdxl", seed=5), tmp_path / "base")
    refiner = tiny.save_pretrained(tiny.stable_diffusion("sdxl_refiner", seed=6), tmp_path / "refiner")
    assert main(["generate", "--model", str(base), "--refiner", str(refiner), "--high-noise-frac", "0.7", "a cat",
                 "--steps", "5", "--seed", "2", "--height", "16", "--width", "16", "--guidance", "4", "--scheduler",
                 "euler", "-o", str(tmp_path / "refined.png")]) == 0
    expected = refine(load_pipeline(base), load_pipeline(refiner), "a cat", high_noise_frac=0.7, steps=5, seed=2,
                      height=16, width=16, guidance_scale=4.0, scheduler="euler").images[0]
    refined = Image.open(tmp_path / "refined.png")
    assert np.array_equal(np.asarray(refined), np.asarray(expected))
    assert json.loads(refined.text["sd_core"])["high_noise_frac"] == 0.7

    capsys.readouterr()
    assert main(["generate", "--model", str(sd), "x", "--mask", str(tmp_path / "mask.png"), "-o",
                 str(tmp_path / "x.png")]) == 2
    assert "--mask needs --init-image" in capsys.readouterr().err
    Image.new("1", (9000, 8000)).save(tmp_path / "mask.png")  # 72 Mpixels in a small file
    assert main(["generate", "--model", str(sd), "x", "--init-image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "-o", str(tmp_path / "x.png")]) == 2
    assert "mask.png is 9000x8000 (72.0 Mpixels); the limit is 67.1 Mpixels" in capsys.readouterr().err


def test_generate_with_a_prompt_file_writes_one_file_per_image_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a big red circle on the left on a gray background\n"
                       '{"prompt": "a small blue square in the center on a white background", "images": 2}\n')
    out = tmp_path / "images"
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--steps", "2"]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["00000-00.png", "00001-00.png", "00001-01.png"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--steps", "2"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before


def test_offload_draws_the_same_image(tmp_path):
    plain, offloaded = tmp_path / "plain.png", tmp_path / "offloaded.png"
    common = ["generate", "a big red circle on the left on a gray background", "--steps", "3", "--seed", "4"]
    assert main([*common, "-o", str(plain)]) == 0
    assert main([*common, "--offload", "-o", str(offloaded)]) == 0
    assert plain.read_bytes() == offloaded.read_bytes()


def test_off_vocabulary_words_are_named_for_the_embedded_model(tmp_path, capsys):
    assert main(["generate", "an astronaut riding a horse", "--steps", "1", "-o", str(tmp_path / "a.png")]) == 0
    note = capsys.readouterr().err
    assert "'astronaut', 'horse', 'riding'" in note and "a big red circle on the left" in note
    assert main(["generate", "a big red circle on the left on a gray background", "--steps", "1",
                 "-o", str(tmp_path / "b.png")]) == 0
    assert "never saw" not in capsys.readouterr().err


def test_fast_path_is_opt_in_and_says_so_in_the_image(tmp_path):
    from PIL import Image
    common = ["generate", "a big red circle on the left on a gray background", "--steps", "6", "--seed", "2"]
    assert main([*common, "-o", str(tmp_path / "parity.png")]) == 0
    assert main([*common, "--deepcache", "2", "-o", str(tmp_path / "fast.png")]) == 0
    parity, fast = Image.open(tmp_path / "parity.png"), Image.open(tmp_path / "fast.png")
    assert "fast" not in json.loads(parity.info["sd_core"])
    assert "deepcache=2" in json.loads(fast.info["sd_core"])["fast"]
    assert np.asarray(parity).tolist() != np.asarray(fast).tolist()
    assert main([*common, "--tgate", "0.5", "--guidance-until", "0.7", "-o", str(tmp_path / "gated.png")]) == 0
    recorded = json.loads(Image.open(tmp_path / "gated.png").info["sd_core"])
    assert "guidance_until=0.7,tgate=0.5" in recorded["fast"] and (recorded["tgate"], recorded["guidance_until"]) == (0.5, 0.7)
    assert "deepcache" not in recorded  # only the options away from "off" are recorded


def test_fast_flags_are_refused_where_the_parity_path_runs(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--tgate", "0.5"]) == 2
    assert "A prompt file (--prompts) runs the parity path; drop --tgate" in capsys.readouterr().err
    assert main(["generate", "x", "--guidance-until", "0", "-o", str(tmp_path / "x.png")]) == 2
    assert "guidance_until must be a number from 0.05 to 1; got 0" in capsys.readouterr().err


def test_a_size_far_from_the_trained_one_is_warned_naming_the_trained_size(tmp_path, capsys):
    assert main(["generate", "a big red circle on the left on a gray background", "--steps", "1", "--width", "128",
                 "--height", "128", "-o", str(tmp_path / "a.png")]) == 0
    assert "this model was trained at 64x64 px; 128x128 is far from it" in capsys.readouterr().err
    assert main(["generate", "a big red circle on the left on a gray background", "--steps", "1",
                 "-o", str(tmp_path / "b.png")]) == 0
    assert "trained at" not in capsys.readouterr().err


def test_a_run_past_the_work_bound_is_refused_naming_the_bound_and_force(folders, tmp_path, capsys, monkeypatch):
    sd, dit = folders
    assert main(["generate", "x", "--width", "4096", "--height", "4096", "--steps", "1",
                 "-o", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert "4096x4096 is 16.8 Mpx-steps; this machine (cpu) allows 13.6 Mpx-steps per text-to-image request" in error
    assert "or pass --force to run it anyway" in error and not any(tmp_path.iterdir())
    monkeypatch.setattr("sd_core.__main__.MAX_SECONDS", 1e-6)
    small = ["--steps", "1", "--height", "16", "--width", "16", "-o", str(tmp_path / "y.png")]
    assert main(["generate", "--model", str(sd), "x", *small]) == 2
    assert main(["dit", "--model", str(dit), "1", *small[:2], "-o", str(tmp_path / "d.png")]) == 2
    assert "per DiT request" in capsys.readouterr().err
    assert main(["generate", "--model", str(sd), "x", *small, "--force"]) == 0 and (tmp_path / "y.png").is_file()


def test_an_input_error_prints_on_its_own_line_before_any_progress_bar(folders, tmp_path, capsys):
    sd, _ = folders
    (tmp_path / "fake.png").write_text("not an image")
    assert main(["generate", "--model", str(sd), "x", "--init-image", str(tmp_path / "fake.png"), "--steps", "2",
                 "-o", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Cannot read fake.png as an image") and "%|" not in error


def test_ctrl_c_prints_one_line_and_exits_130(folders, tmp_path, capsys, monkeypatch):
    sd, _ = folders

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("sd_core.__main__.generate", interrupted)
    assert main(["generate", "--model", str(sd), "x", "--steps", "1", "-o", str(tmp_path / "x.png")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted, nothing half-written"]
    assert not any(tmp_path.iterdir())
