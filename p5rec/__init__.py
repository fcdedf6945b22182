"""p5rec: recommendation as language processing (P5-style), offline and CPU-friendly."""

__version__ = "0.1.0"
