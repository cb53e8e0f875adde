"""sraseg: SRA-Seg (synthetic-to-real aligned semi-supervised segmentation) as a staged workflow."""

__version__ = "0.1.0"
