"""flaxtumor: brain-tumour detection and segmentation on LGG MRI slices in JAX/Flax.

Research use only: not a medical device.
"""

__version__ = "0.1.0"
