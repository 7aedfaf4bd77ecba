"""sparse-dc: sparse Llama pretraining when unique data is scarce, and the scaling law that plans it."""
__version__ = "0.1.0"
