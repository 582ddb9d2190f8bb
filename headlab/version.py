"""headlab's version, in a module of its own so that any package can read it without importing the package
root (`headlab/__init__.py` re-exports it as `headlab.__version__`)."""

__version__ = "0.1.0"
