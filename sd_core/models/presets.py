"""Configs of the released Stable Diffusion models, in diffusers/transformers field names.

Used to build real-size models (on the `meta` device for name/shape checks, or with random weights
for benchmarks) and to know the architecture of an original single-file checkpoint.
"""

VAE_SD = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512, "scaling_factor": 0.18215,
}
VAE_SDXL = {**VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

CLIP_VIT_L = {  # OpenAI CLIP ViT-L/14 text tower: SD1.x, and SDXL's first encoder
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    "layer_norm_eps": 1e-5, "eos_token_id": 2,
}
OPENCLIP_VIT_H = {  # SD2.x: 24 layers trained, the last dropped since SD2 conditions on the penultimate one
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
    "layer_norm_eps": 1e-5, "eos_token_id": 2,
}
OPENCLIP_VIT_BIGG = {  # SDXL's second encoder, with the text projection
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
    "layer_norm_eps": 1e-5, "eos_token_id": 2,
}

UNET_SD15 = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "act_fn": "silu",
}
UNET_SD15_INPAINT = {**UNET_SD15, "in_channels": 9}
UNET_SD21 = {  # stable-diffusion-2-1 (768-v)
    **UNET_SD15, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "use_linear_projection": True, "upcast_attention": True,
}
UNET_SDXL_BASE = {
    **UNET_SD15, "sample_size": 128, "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
UNET_SDXL_REFINER = {
    **UNET_SDXL_BASE, "block_out_channels": [384, 768, 1536, 1536],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [6, 12, 24, 24], "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
    "projection_class_embeddings_input_dim": 2560,
}

# Scheduler configs the released models ship with (diffusers field names).
SCHEDULER_SD = {  # SD 1.x and 2.x base (written for PNDM; every sd_core sampler accepts it)
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "epsilon",
}
SCHEDULER_SD2_V = {**SCHEDULER_SD, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
SCHEDULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "timestep_spacing": "leading",
    "prediction_type": "epsilon", "use_karras_sigmas": False,
}
SCHEDULER_DIT = {  # what diffusers' DiT conversion writes
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
    "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": False,
}

# ControlNets: the UNet's encoder settings plus the hint encoder's (diffusers' ControlNetModel fields).
_CONTROLNET_FIELDS = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "attention_head_dim",
                      "cross_attention_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift",
                      "downsample_padding", "act_fn", "use_linear_projection", "upcast_attention",
                      "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim",
                      "projection_class_embeddings_input_dim")
_HINT_ENCODER = {"conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256]}
CONTROLNET_SD15 = {**{k: v for k, v in UNET_SD15.items() if k in _CONTROLNET_FIELDS}, **_HINT_ENCODER}  # lllyasviel/control_v11p_sd15_*
CONTROLNET_SD21 = {**{k: v for k, v in UNET_SD21.items() if k in _CONTROLNET_FIELDS}, **_HINT_ENCODER}  # thibaud/controlnet-sd21
CONTROLNET_SDXL = {**{k: v for k, v in UNET_SDXL_BASE.items() if k in _CONTROLNET_FIELDS}, **_HINT_ENCODER}  # diffusers/controlnet-canny-sdxl-1.0
