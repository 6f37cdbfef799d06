"""cxrray: Ray-native chest-radiograph diffusion platform."""
__version__ = "0.1.0"
