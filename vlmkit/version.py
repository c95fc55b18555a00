"""The package version (a module of its own so that any vlmkit module can read it without importing the face)."""
__version__ = "0.1.0"
