"""ddimctl: DDIM sampling, inversion and training for DDPM image diffusion models."""

__version__ = "0.1.0"
