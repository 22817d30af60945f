"""msi: MSI (ICMR 2024) multi-modal recommendation, with data preparation, honest evaluation and serving."""

__version__ = "0.1.0"
