"""DAug (Jin et al.): a noise-aware classifier over super-classes (`superclasses`, `noisy_classifier`) whose
gradients guide an image-to-image translation of the pixel DDPM (`translate`); the change becomes heatmap
channels for a retrieval + classification model. Built so far: the super-classes, the noise-aware classifier
with its AP per class at several noise levels (the paper's Table 1 analogue), guided translation and heatmaps,
and the heatmap-augmented shards (`augment`). Not yet: the downstream model and its hybrid contrastive loss."""
