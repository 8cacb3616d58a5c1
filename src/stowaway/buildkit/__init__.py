"""BuildKit frontend: Nix derivations as BuildKit ExecOps (one derivation, one step).

``drv`` parses .drv files, ``llb`` marshals LLB ops, ``graph`` maps a derivation graph
to ops and the image to layered copies, ``frontend`` is the gateway client the frontend
image runs, ``context`` writes the build context on the client (``stowaway buildkit
context``). Only ``drv``, ``llb``, ``spec``, ``graph`` and ``frontend`` go into the
frontend image: they need nothing beyond grpcio, protobuf and the stdlib.
"""
