"""The ``stowaway serve`` registry: ``app``/``api`` over a ``storage`` backend, with
Nixery-style on-demand images from ``nix_resolver``. The protocol's errors and the push
client live below, in ``stowaway.distribution``."""
