"""textcl's version, in a module that imports nothing, so that any package can read it without importing
`textcl/__init__.py` (which names every package)."""

__version__ = "0.1.0"
