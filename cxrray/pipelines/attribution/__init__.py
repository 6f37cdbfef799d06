"""Latent-diffusion visual attribution (Siddiqui et al.): the healthy counterpart of an abnormal image by
text-guided img2img (SDEdit) with a report-conditioned latent diffusion model (`img2img`), the map
abnormal - healthy, the paper's DreamBooth fine-tune with prior preservation on class prompts (`dreambooth`)
and its miniature (`reproduce`)."""
