"""The stowaway snapshotter, laid out by job like containerd's overlay snapshotter:
containerd's contract (``contract``), the snapshotter's methods (``store_snapshotter``)
and what they lean on: the state directory, link dir and mode record (``state``), where
store paths are found or substituted and the local store's collection (``store_paths``),
the background stub trees (``trees``) and walks of snapshot files (``files``)."""
