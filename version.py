"""kiln's version, in a module of its own that imports nothing, so any package can read it without importing
the root `kiln` package (which may import every package)."""

__version__ = "0.1.0"
