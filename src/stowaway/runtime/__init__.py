"""Runtime faces: the containerd snapshotter and the CRI image service."""
