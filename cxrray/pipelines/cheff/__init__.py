"""Cheff (cascaded latent diffusion): the cascade object (`cascade`), latent shards for stage 2 (`latents`),
report-prompted generation (`generate`), `cxrray evaluate generation` (`evaluate`) and the paper's
miniature (`reproduce`)."""
