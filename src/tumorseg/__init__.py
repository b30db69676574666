"""tumorseg: brain tumour segmentation for BraTS 2020 multimodal MRI."""

__version__ = "0.1.0"
