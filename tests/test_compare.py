import json

import numpy as np
import pytest
import torch

from compare.__main__ import main as compare_main
from compare.kinds import KINDS, run_comparison
from compare.parity import compare_images, first_divergence, run_parity
from compare.plots import bar_chart, line_plot
from sd_core.checkpoints.loading import load_pipeline
from tests import tiny
from tests.helpers import slow_unless


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: tiny.save_pretrained(tiny.stable_diffusion(family, seed=7), tmp_path_factory.mktemp(family))
            for family in ("sd1", "sdxl")}


@pytest.mark.parametrize("family,scheduler", slow_unless([("sd1", "ddim"), ("sd1", "euler_ancestral"), ("sdxl", "dpmpp_2m"),
                                                           ("sd1", "lms")],  # LMS: diffusers integrates with scipy
                                                          [("sd1", "ddim")]))
def test_parity_run_passes_every_stage_and_writes_reports(folders, family, scheduler, tmp_path):
    report = run_parity(folders[family], "a red circle", "blurry", seed=3, steps=4, scheduler=scheduler,
                        guidance_scale=5.0, height=16, width=24)
    failed = [s.name for s in report.stages if not s.passed]
    assert report.passed, failed
    names = [s.name for s in report.stages]
    assert "token ids (tokenizer)" in names and "text embeddings (UNet input)" in names
    assert "step 4 noise prediction" in names and "step 4 latents" in names and names[-1] == "decoded images (8-bit)"
    assert report.divergence["first_divergent"] is None and report.divergence["modules_compared"] > 50
    folder = report.write(tmp_path / "report")
    data = json.loads((folder / "report.json").read_text())
    assert data["passed"] and len(data["stages"]) == len(report.stages)
    assert "| stage |" in (folder / "report.md").read_text()
    assert (folder / "images.png").stat().st_size > 0


def unet_inputs(pipe):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor(500), context


def planted_divergence(folder, plant):
    import diffusers
    ours = load_pipeline(folder)
    reference = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    plant(ours.unet)
    sample, t, context = unet_inputs(ours)
    return first_divergence(ours.unet, reference, lambda: ours.unet(sample, t, context),
                            lambda: reference(sample, t, encoder_hidden_states=context))


def test_a_wrong_group_norm_eps_is_located_by_name(folders):
    def plant(unet):
        unet.down_blocks[0].resnets[0].norm2.eps = 1e-1
    result = planted_divergence(folders["sd1"], plant)
    assert result["first_divergent"]["name"] == "down_blocks.0.resnets.0.norm2"


def test_a_swapped_sin_cos_is_located_at_the_time_embedding(folders, monkeypatch):
    import sd_core.models.unet
    real = sd_core.models.unet.timestep_embedding

    def swapped(t, dim, flip_sin_to_cos, shift, **kwargs):
        return real(t, dim, not flip_sin_to_cos, shift, **kwargs)
    monkeypatch.setattr(sd_core.models.unet, "timestep_embedding", swapped)
    result = planted_divergence(folders["sd1"], lambda unet: None)
    assert result["first_divergent"]["name"] == "time_embedding.linear_1"


def test_image_comparison_counts_levels():
    import numpy as np
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    assert compare_images(a, b).passed and compare_images(a, b).extra["psnr_db"] == float("inf")
    b[0, 0, 0, 0] = 1
    assert not compare_images(a, b).passed  # 1 of 384 values: more than 0.1%
    b[0, 0, 0, 0] = 3
    assert compare_images(a, b).extra["differing_values"] == 1 and compare_images(a, b).max_abs == 3


# ------------------------------------------------------------------------------ run_comparison, every kind

@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    return tiny.save_pretrained(tiny.dit(seed=4, num_classes=1000), tmp_path_factory.mktemp("dit"))


def first_failed(report):
    return next(s.name for s in report.stages if not s.passed)


def test_every_kind_is_offered():
    assert set(KINDS) == {"text_to_image", "image_to_image", "vae", "controlnet", "dit", "dit_timestep_semantics",
                          "precision", "attention", "fast_path"}
    with pytest.raises(ValueError, match="Unknown comparison"):
        run_comparison("everything")


def test_text_to_image_report_has_plots_verdict_and_writes_home(folders, tmp_path):
    report = run_comparison("text_to_image", folders["sd1"], prompt="a red circle", steps=3, guidance_scale=4.0,
                            height=16, width=16, scheduler="ddim")
    assert report.passed and report.verdict.startswith("text_to_image: PASS") and "identical" in report.verdict
    assert set(report.plots) == {"per-step", "per-module"} and len(report.images) == 3
    modules = report.divergence["modules"]
    assert len(modules) == report.divergence["modules_compared"] > 50 and all(m["passed"] for m in modules)
    folder = report.write(tmp_path / "out")
    data = json.loads((folder / "report.json").read_text())
    assert data["kind"] == "text_to_image" and data["passed"] and data["verdict"] == report.verdict
    assert report.verdict in (folder / "report.md").read_text()
    for name in ("images.png", "plot-per-step.png", "plot-per-module.png"):
        assert (folder / name).stat().st_size > 0
    with pytest.raises(FileExistsError):
        report.write(folder / "report.json")


def test_a_wrong_group_norm_eps_in_the_unet_is_reported_at_step_1_and_the_module(folders):
    pipe = load_pipeline(folders["sd1"])
    pipe.unet.down_blocks[0].resnets[0].norm2.eps = 1e-1
    report = run_comparison("text_to_image", pipe, prompt="a red circle", steps=2, guidance_scale=4.0,
                            height=16, width=16, scheduler="ddim")
    assert report.passed is False and "FAIL" in report.verdict
    assert next(s for s in report.stages if s.name.startswith("text embeddings")).passed
    assert first_failed(report) == "step 1 noise prediction"
    first = report.divergence["first_divergent"]["name"]
    assert first == "down_blocks.0.resnets.0.norm2" and first in report.verdict
    names = [m["name"] for m in report.divergence["modules"]]
    assert next(m for m in report.divergence["modules"] if not m["passed"])["name"] == first
    assert names.index(first) > 0  # modules before it agreed


@pytest.mark.parametrize("family", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_image_to_image_equals_diffusers_img2img(folders, family):
    report = run_comparison("image_to_image", folders[family], prompt="a red circle", strength=0.5, steps=4,
                            guidance_scale=4.0, scheduler="euler")
    assert report.passed, [s.name for s in report.stages if not s.passed]
    assert "step 2 latents" in [s.name for s in report.stages] and "step 3 latents" not in [s.name for s in report.stages]
    assert report.settings["strength"] == 0.5 and "input" in report.images


def test_vae_round_trip_equals_diffusers_and_a_wrong_decoder_eps_is_found_at_decode(folders):
    report = run_comparison("vae", folders["sd1"], size=16)
    assert report.passed and [s.name for s in report.stages][:3] == ["encoder mean", "encoder std", "latents (scaled)"]
    assert report.measurements["psnr_sd_core_db"] == report.measurements["psnr_diffusers_db"]
    pipe = load_pipeline(folders["sd1"])
    pipe.vae.decoder.up_blocks[0].resnets[0].norm1.eps = 1e-1
    report = run_comparison("vae", pipe, size=16)
    assert not report.passed and first_failed(report) == "decoded (float)"
    assert report.divergence["first_divergent"]["name"] == "decoder.up_blocks.0.resnets.0.norm1"


@pytest.mark.parametrize("guided_channels", ["all", "first3"])
def test_dit_sampling_equals_its_reference_in_both_guidance_modes(dit_folder, guided_channels):
    report = run_comparison("dit", dit_folder, class_labels=[3, 7], steps=4, scheduler="ddim", guidance_scale=4.0,
                            guided_channels=guided_channels)
    assert report.passed and report.stages[-1].max_abs == 0, report.verdict
    if guided_channels == "first3":  # the deviation from diffusers' all-channel guidance is measured, and real
        assert report.measurements["first3_vs_all_latents_relative"] > 1e-3
        assert "diffusers (all channels)" in report.images


def test_the_dit_divisor_planted_in_sd_core_is_found_at_the_timestep_embedder(dit_folder):
    pipe = load_pipeline(dit_folder)
    for block in pipe.transformer.transformer_blocks:
        block.norm1.emb.frequency_shift = 0  # the original code's divisor where diffusers' weights expect half - 1
    report = run_comparison("dit", pipe, class_labels=[3], steps=3, scheduler="ddim")
    assert not report.passed and first_failed(report) == "step 1 noise prediction"
    assert report.divergence["first_divergent"]["name"] == "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"


def test_dit_timestep_semantics_shows_what_the_choice_changes(dit_folder):
    report = run_comparison("dit_timestep_semantics", dit_folder, class_labels=[3], steps=3, scheduler="ddim")
    assert report.passed is None and report.stages[-1].max_abs > 0 and report.measurements["image_psnr_db"] < 80
    assert report.divergence["first_divergent"]["name"] == "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"
    assert first_failed(report) == "step 1 noise prediction" and len(report.images) == 3


def test_precision_measures_the_bf16_drift_of_every_stage(folders):
    report = run_comparison("precision", folders["sd1"], dtype="bf16", device="cpu", prompt="a red circle", steps=3,
                            guidance_scale=4.0, height=16, width=16, scheduler="ddim")
    assert report.passed is None and report.verdict.startswith("precision: bf16 vs fp32")
    latents = report.stages[-2]
    assert latents.name == "step 3 latents" and 0 < latents.relative < 0.5 and latents.extra["cosine_distance"] > 0
    assert report.measurements["bf16_image_psnr_db"] > 20 and set(report.plots) == {"per-step", "per-module"}
    assert report.divergence["tolerance"] == torch.finfo(torch.bfloat16).eps


FAST_PATH_MIN_PSNR = {(0, None): 40.0, (3, None): 22.0, (0, 0.5): 28.0}  # dB; measured on the embedded model
# (fp32, 12 steps): channels_last 83.0, DeepCache N=3 26.4, ToMe 0.5 34.4


@pytest.mark.parametrize("deepcache,tome", slow_unless([(0, None), (3, None), (0, 0.5)], [(0, None)]))
def test_fast_path_is_measured_against_the_parity_path_on_the_embedded_model(deepcache, tome, tmp_path, capsys):
    report = run_comparison("fast_path", deepcache=deepcache, bf16="off", tome=tome, prompt="a big yellow triangle on "
                            "the right on a black background", steps=12, guidance_scale=5.0, seed=2)
    assert report.passed is None and report.verdict.startswith("fast_path: a measurement, not parity")
    assert list(report.images)[:2] == ["parity path", f"fast path ({report.settings['fast']})"]
    assert list(report.images)[2].startswith("|difference| x") and set(report.plots) == {"per-step"}
    psnr_db, levels = report.measurements["image_psnr_db"], report.measurements["image_max_levels"]
    print(f"fast_path deepcache={deepcache} tome={tome}: PSNR {psnr_db:.1f} dB, max {levels:.0f} levels")
    assert psnr_db > FAST_PATH_MIN_PSNR[deepcache, tome]
    steps = {s.name: s for s in report.stages}
    if tome:  # merged tokens from the first step on
        assert steps["step 1 noise prediction"].max_abs > 1e-4 and "tome=0.5" in report.settings["fast"]
    elif deepcache:  # step 1 is a full pass (DeepCache starts full); step 2 reuses step 1's deep features
        assert steps["step 1 noise prediction"].max_abs < 1e-4 < steps["step 2 noise prediction"].max_abs
        assert levels > 0 and "deepcache=3" in report.settings["fast"]
    else:  # fp32 channels_last: the same convolutions in another layout
        assert levels <= 1 and max(s.relative for s in report.stages if s.name.startswith("step")) < 1e-3
    assert compare_main(["fast_path", "--deepcache", "2", "--bf16", "off", "--steps", "3",
                         "--out", str(tmp_path / "cli")]) == 0
    assert ("\nfast_path: a measurement, not parity: the fast path (channels_last,deepcache=2,float32 (asked))"
            in capsys.readouterr().out)


def test_math_and_sdpa_attention_agree_and_a_fault_in_one_is_found(dit_folder, monkeypatch):
    report = run_comparison("attention", dit_folder, class_labels=[3], steps=3, scheduler="ddim")
    assert report.passed and report.stages[-1].max_abs == 0, report.verdict
    import sd_core.models.layers
    real = sd_core.models.layers.attend

    def faulty(q, k, v, heads, *args, backend="sdpa", **kwargs):  # SDPA without its 1/sqrt(d) scale
        return real(q * (q.shape[-1] // heads) ** 0.5 if backend == "sdpa" else q, k, v, heads, *args,
                    backend=backend, **kwargs)
    monkeypatch.setattr(sd_core.models.layers, "attend", faulty)
    report = run_comparison("attention", dit_folder, class_labels=[3], steps=3, scheduler="ddim")
    assert report.passed is False
    # attend() is a function, not a module: the first module to see its output is the projection after it
    assert report.divergence["first_divergent"]["name"] == "transformer_blocks.0.attn1.to_out.0"


def test_plots_are_pil_images_with_the_first_module_over_threshold_marked():
    plot = line_plot({"latents": [1e-7, 0.0, 3e-3]}, "relative error", threshold=1e-4)
    assert plot.size == (560, 300)
    chart = bar_chart(["a", "b", "c"], [1e-8, 1.0, 1e-8], "modules", threshold=1e-4, marked=1)
    pixels = chart.convert("RGB").getdata()
    assert (214, 39, 40) in set(pixels)  # the marked bar is drawn red


IDENTICAL_GREEN = (44, 120, 44)


def test_an_all_zero_error_plot_says_identical_instead_of_drawing_on_the_floor():
    for plot in (line_plot({"latents": [0.0, 0.0], "noise prediction": [0.0, 0.0]}, "per step", threshold=1e-4),
                 bar_chart(["a", "b"], [0.0, 0.0], "per module", threshold=1e-4)):
        colours = set(plot.convert("RGB").getdata())
        assert IDENTICAL_GREEN in colours and (230, 230, 230) not in colours  # the word, and no log grid
    assert IDENTICAL_GREEN not in set(line_plot({"latents": [0.0, 1e-6]}, "per step").convert("RGB").getdata())


def test_plot_text_is_tall_enough_to_read_once_the_gallery_shrinks_the_plot():
    from compare.plots import TOP
    title = np.asarray(bar_chart(["a"], [1.0], "relative error per module (Tq)").convert("L"))[:TOP] < 128
    rows = np.flatnonzero(title.any(axis=1))
    assert rows.max() - rows.min() + 1 >= 16  # PIL's default bitmap font: 10 px from ascender to descender


def test_a_report_names_its_model_without_the_machines_folders(folders):
    from sd_core.checkpoints.catalog import EMBEDDED_TEXT_TO_IMAGE
    report = run_comparison("vae", folders["sd1"], size=16)
    assert report.settings["model"] == folders["sd1"].name
    assert str(folders["sd1"].parent) not in report.markdown() + json.dumps(report.to_dict(), default=str)
    assert run_comparison("vae", EMBEDDED_TEXT_TO_IMAGE, size=16).settings["model"] == "embedded: shapes (text to image)"


def test_difference_gains_are_given_to_three_figures():
    from compare.parity import difference_caption
    assert (difference_caption(255 / 27), difference_caption(255.0), difference_caption(1.0)) == (
        "|difference| x9.44", "|difference| x255", "|difference| x1")


@pytest.mark.parametrize("argv,message", [
    (["text_to_image", "--steps", "0"], "positive integer"),
    (["text_to_image", "--width", "7"], "width must be a whole number from 8"),
    (["vae", "--model", "no-such-model"], "no such folder"),
    (["vae", "--model", "/no/such/model"], "neither a folder"),
])
def test_cli_bad_input_is_a_clear_error_and_exit_2(folders, argv, message, capsys, tmp_path):
    if "--model" not in argv:
        argv = argv + ["--model", str(folders["sd1"])]
    try:
        code = compare_main(argv + ["--out", str(tmp_path / "out")])
    except SystemExit as exit:
        code = exit.code
    error = capsys.readouterr().err
    assert code == 2 and message in error and "Traceback" not in error


def test_cli_refuses_an_existing_file_as_out_and_writes_a_report_folder(folders, tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    with pytest.raises(SystemExit) as exit:
        compare_main(["vae", "--model", str(folders["sd1"]), "--out", str(existing)])
    assert exit.value.code == 2 and "existing file" in capsys.readouterr().err
    assert compare_main(["vae", "--model", str(folders["sd1"]), "--size", "16", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.startswith("vae: PASS")
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.json", "report.md", "images.png",
                                                            "plot-per-module.png"}


def test_a_swapped_sin_cos_in_the_dit_is_found_at_the_timestep_embedder(dit_folder, monkeypatch):
    import sd_core.models.dit
    real = sd_core.models.dit.timestep_embedding
    monkeypatch.setattr(sd_core.models.dit, "timestep_embedding",
                        lambda t, dim, flip_sin_to_cos, **kwargs: real(t, dim, not flip_sin_to_cos, **kwargs))
    report = run_comparison("dit", dit_folder, class_labels=[3], steps=2, scheduler="ddim")
    assert not report.passed and first_failed(report) == "step 1 noise prediction"
    assert report.divergence["first_divergent"]["name"] == "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"


def test_diffusers_ignores_the_frequencies_field_so_original_dit_frequencies_show_as_a_deviation(dit_folder, tmp_path):
    from compare.self_kinds import with_timestep_frequencies
    from sd_core.checkpoints.saving import save_pipeline
    original = save_pipeline(with_timestep_frequencies(load_pipeline(dit_folder), "original"), tmp_path / "original")
    assert load_pipeline(original).transformer.config.timestep_frequencies == "original"
    report = run_comparison("dit", original, class_labels=[3], steps=2, scheduler="ddim")
    assert not report.passed  # diffusers ignores the field: its DiT divides by half - 1
    assert report.divergence["first_divergent"]["name"] == "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"


def test_a_single_file_model_is_compared_on_its_loaded_tensors(folders, tmp_path):
    from sd_core.checkpoints.saving import export_single_file
    path = export_single_file(load_pipeline(folders["sd1"]), tmp_path / "sd1.safetensors")
    pipe = load_pipeline(path, config=folders["sd1"])
    report = run_comparison("vae", pipe, size=16)
    assert report.passed and report.stages[-1].max_abs == 0
    assert [caption for _, caption in report.gallery()][-1] == "per-module"


def test_the_reference_shares_sd_core_s_tensors_writes_no_weights_and_changes_none(folders, dit_folder, monkeypatch):
    """A real model's reference used to be gigabytes written to a temporary folder and read back on every Compare."""
    import safetensors.torch

    from compare.parity import reference_pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a weights file was written")
    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    monkeypatch.setattr(torch, "save", refuse)
    pipes = {"StableDiffusionPipeline": load_pipeline(folders["sd1"]),
             "StableDiffusionXLPipeline": load_pipeline(folders["sdxl"]), "DiTPipeline": load_pipeline(dit_folder)}
    for pipeline_class, pipe in pipes.items():
        reference = reference_pipeline(pipe)
        assert type(reference).__name__ == pipeline_class
        for name, model in pipe.models.items():
            theirs = getattr(reference, name).state_dict()
            assert all(theirs[key].data_ptr() == tensor.data_ptr() for key, tensor in model.state_dict().items())
    pipe = pipes["StableDiffusionPipeline"]
    before = {key: tensor.clone() for key, tensor in pipe.unet.state_dict().items()}
    assert run_comparison("text_to_image", pipe, steps=2, height=16, width=16).passed
    assert all(torch.equal(tensor, before[key]) and tensor.dtype == torch.float32
               for key, tensor in pipe.unet.state_dict().items())


def test_a_half_precision_pipeline_is_compared_as_an_fp32_copy_and_left_unchanged(dit_folder):
    pipe = load_pipeline(dit_folder, dtype=torch.bfloat16)
    report = run_comparison("dit", pipe, class_labels=[3], steps=2, scheduler="ddim")
    assert report.passed and pipe.transformer.proj_out_2.weight.dtype == torch.bfloat16


def test_cli_runs_a_dit_kind_with_class_names_and_ids(dit_folder, tmp_path, capsys):
    assert compare_main(["dit", "--model", str(dit_folder), "--classes", "class 3,7", "--steps", "2",
                         "--scheduler", "ddim", "--guided-channels", "first3", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.startswith("dit (first3): PASS")
    assert json.loads((tmp_path / "r" / "report.json").read_text())["settings"]["class_labels"] == [3, 7]


@pytest.mark.slow
def test_benchmark_under_two_processes_gathers_every_row_on_the_main_process(tmp_path, monkeypatch):
    """Each process measures a share of the (dtype, config) jobs; the main process prints and writes them all, without
    diffusers' notices (the suite's own environment quiets them: a user's does not)."""
    from tests.launch import launch
    monkeypatch.delenv("DIFFUSERS_VERBOSITY")
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY")
    rows = {}
    for processes in (1, 2):
        out = tmp_path / f"bench-{processes}.json"
        result = launch(processes, ["compare", "benchmark", "--configs", "embedded", "--dtypes", "fp32,bf16",
                                    "--repeats", "1", "--fast", "none", "--json", str(out)], timeout=300)
        rows[processes] = [(r["config"], r["dtype"], r["what"]) for r in json.loads(out.read_text())]
        assert result.stdout.count("| embedded | fp32 | pipeline") == 1
        assert "should be kept in float32" not in result.stderr and "torchvision" not in result.stderr
    assert rows[1] == rows[2] == [("embedded", "fp32", "pipeline (20 steps, CFG, 64 px)")]


def test_python_m_compare_prints_no_library_notices(tmp_path, monkeypatch):
    """transformers' torchvision fallback notices and diffusers' safety-checker warning (image to image) printed on
    every run; the suite's environment quiets both libraries, so the command runs here as a user runs it."""
    from tests.launch import launch
    monkeypatch.delenv("DIFFUSERS_VERBOSITY")
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY")
    result = launch(1, ["compare", "image_to_image", "--steps", "2", "--out", str(tmp_path / "report")], timeout=300)
    assert result.stderr.strip() == "" and "image_to_image: PASS" in result.stdout


def test_a_comparison_keeps_the_log_quiet(capfd):
    """Every Compare used to print diffusers' loading bars and notices into the server's log."""
    from compare.kinds import run_comparison
    run_comparison("image_to_image", None, steps=2)
    log = capfd.readouterr().err
    assert "Loading pipeline components" not in log and "safety checker" not in log, log[-500:]


def test_the_per_module_probe_feeds_the_refiner_its_own_five_time_ids(tmp_path):
    """The probe's SDXL conditioning comes from the pipeline's own time ids: the refiner's are 5 (size, crop,
    aesthetic score), so its pooled embedding is wider than 6 ids would leave; a refiner UNet accepts the probe."""
    from compare.parity import probe_conditioning
    folder = tmp_path / "refiner"
    tiny.save_pretrained(tiny.stable_diffusion("sdxl_refiner"), folder)
    refiner = load_pipeline(folder)
    added = probe_conditioning(refiner, 2, 16, 16)
    assert added["time_ids"].tolist() == [[16.0, 16, 0, 0, 6.0]] * 2
    config = refiner.unet.config
    assert added["text_embeds"].shape == (2, config.projection_class_embeddings_input_dim - 5 * config.addition_time_embed_dim)
    sample = torch.randn(2, config.in_channels, 2, 2)
    refiner.unet(sample, torch.tensor(500), torch.randn(2, 77, config.cross_attention_dim), added)


def test_gpu_parity_rows_put_sd_core_and_diffusers_equally_far_from_fp32(monkeypatch):
    """The GPU script's parity rows, run here on tiny UNets in bfloat16 on the CPU: both stacks round the same
    operations, so sd_core's half-precision output is as close to fp32 as diffusers' and close to diffusers'."""
    from compare import gpu_parity
    from tests import tiny
    monkeypatch.setitem(gpu_parity.UNET_CONFIGS, "sdxl", tiny.UNETS["sdxl"])
    monkeypatch.setitem(gpu_parity.CONTEXT_WIDTH, "sdxl", tiny.UNETS["sdxl"]["cross_attention_dim"])
    [row] = gpu_parity.step_agreement("sdxl", ["bf16"], latent=8)
    assert row.dtype == "bf16" and 0 < row.ours_vs_fp32 < 1e-3 and 0 < row.theirs_vs_fp32 < 1e-3
    assert row.ours_vs_fp32 < 2 * row.theirs_vs_fp32 and row.ours_vs_theirs < 1e-3


def test_benchmark_rows_give_the_fastest_time_its_spread_and_the_first_call_apart():
    """The first call (where torch.compile compiles) is timed apart; the row is the fastest repeat, with the spread."""
    import time

    from compare.measure import measure, table
    calls = {"ours": 0}

    def ours():
        calls["ours"] += 1
        time.sleep(0.3 if calls["ours"] == 1 else 0.02 * calls["ours"])

    row = measure("tiny", "fp32", "sleep", ours, lambda: time.sleep(0.01), repeats=3)
    assert row.sd_core_first_s >= 0.3 and 0.04 <= row.sd_core_s < 0.06 and row.sd_core_spread > 0.4
    assert "(+" in table([row]).splitlines()[-1] and row.diffusers_s < row.sd_core_s


TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8, patch_size=2, in_channels=4,
                out_channels=8, num_embeds_ada_norm=10)


@pytest.mark.parametrize("family", [pytest.param("sd2", marks=pytest.mark.slow), "sdxl", "dit"])
def test_every_benchmark_row_of_a_model_runs_and_the_plain_rows_compute_what_diffusers_does(family):
    """The real-size configs' rows (plain, ControlNet, fast: channels_last, DeepCache, FORA, bf16, ToMe, the OpenVINO
    peer where installed), run once on tiny models of each family: the plain and ControlNet rows give diffusers'
    prediction, the fast rows a PSNR from the parity output."""
    from compare import benchmark
    from tests import tiny
    if family == "dit":
        pairs = benchmark.dit_pairs(torch.float32, 8, "default", TINY_DIT)
    else:
        config = tiny.UNETS[family]
        pairs = benchmark.unet_pairs(config, torch.float32, 8, config["cross_attention_dim"], "default")
    expected = {"UNet step (batch 2)", "ControlNet + UNet step (batch 2)", "fast: UNet step, channels_last",
                "fast: UNet step, bf16 + channels_last"} if family != "dit" else {
                "transformer step (batch 2)", "fast: 3 transformer steps, FORA N=3 (diffusers: 3 steps)",
                "fast: transformer step, bf16"}
    assert expected <= set(pairs)
    for what, factory in pairs.items():
        pair = factory()
        with torch.no_grad():
            ours, theirs = pair.ours(), pair.theirs()
            if not what.startswith(("fast:", "peer:")):
                torch.testing.assert_close(ours, getattr(theirs, "sample", theirs), atol=1e-5, rtol=1e-5)
            else:
                assert 20 < (pair.psnr or pair.peer_psnr)(), what
