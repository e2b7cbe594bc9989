"""The sampling wing: DDIM and the solvers, the table of samplers, timesteps, runners, latents and sample folders."""
