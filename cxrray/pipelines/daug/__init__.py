"""DAug (Jin et al.): a noise-aware classifier over super-classes (`superclasses`, `noisy_classifier`) whose
gradients guide an image-to-image translation; the change becomes heatmap channels for a retrieval +
classification model. Built so far: the super-classes and the noise-aware classifier with its AP per class
at several noise levels (the paper's Table 1 analogue). Not yet: guidance, heatmaps, the downstream model."""
