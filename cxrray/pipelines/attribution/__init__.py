"""Latent-diffusion visual attribution (Siddiqui et al.): the healthy counterpart of an abnormal image by
text-guided img2img (SDEdit) with a report-conditioned latent diffusion model (`img2img`), and the map
abnormal - healthy. The DreamBooth-style fine-tune with prior preservation on class prompts is not built yet."""
