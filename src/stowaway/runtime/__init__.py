"""Runtime faces: the containerd snapshotter (``snapshotter``) and the CRI image service
(``cri``), each a package; the modules at this level are what they and ``stowaway pull``
share or lean on (containerd's API, GC roots, substitution, unpacking, metadata, …)."""
