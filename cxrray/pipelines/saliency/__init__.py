"""Classical saliency, the localisation benchmark's baselines: a finding classifier trained here on the
shards' own images and labels (`classifier`), and its Grad-CAM and integrated-gradients maps (`maps`,
captum does the arithmetic)."""
