"""The OCI distribution API, both ways: the push client (``client``) used by the
``docker://`` sink, and the ``stowaway serve`` registry (``app``/``api`` over a
``storage`` backend, with Nixery-style on-demand images from ``nix_resolver``)."""
