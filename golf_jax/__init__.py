"""golf_jax: the parameter-golf record pipeline in JAX (see README.md)."""

__version__ = "0.1.0"
