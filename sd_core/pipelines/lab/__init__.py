"""The Lab: experiments that ask a model questions and show the answers side by side.

One module per experiment, each built on the pipelines' own records and hooks: `xyz` (AUTOMATIC1111's X/Y/Z
plot over the settings record), `attention_maps` (DAAM: which pixels each prompt word attended to), `walks`
(seed and prompt interpolation), `schedules` (sigma and log-SNR per step of each sampler, and the trajectory
marked with them); `parity_grid` runs a plot's cells through Compare's comparison handed in by the caller;
`drawing` holds the labelled grids, strips and plots they draw with PIL.
"""
