"""The CRI image service kubelet talks to (``stowaway cri-image-service``): the
runtime.v1 ImageService proxy in front of containerd's CRI (``image_service``), the
``nix:0/nix/store/…`` references it answers itself by realising, loading or composing
the image and importing it into containerd (``nix_images``), and its command
(``cli_cri``). It shares containerd's API, GC roots, substitution and unpacking with the
snapshotter and ``stowaway pull`` (``runtime.containerd_client``, ``gcroots``,
``substitute``, ``unpack``)."""
