"""weightless: make neural networks small enough to ship (Weightless, Reagen et al., ICML 2018)."""

__version__ = "0.1.0"
