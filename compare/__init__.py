"""Everything that runs sd_core beside diffusers: stage-by-stage parity, first divergence, speed and memory."""
