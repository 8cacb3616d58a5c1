"""stowaway: Nix store paths as first-class container images.

One engine (store sources -> closure -> layer plan -> deterministic layers ->
image -> sink) with several faces; see docs/architecture.md.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
