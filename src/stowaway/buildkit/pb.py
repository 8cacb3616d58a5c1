"""The generated protobuf modules, imported in one place.

Generated stubs are untyped (mypy skips them), so everything from here is ``Any``; the
rest of the package wraps them in typed functions.
"""

from __future__ import annotations

from stowaway.buildkit.proto import caps_pb2 as caps
from stowaway.buildkit.proto import gateway_pb2 as gateway
from stowaway.buildkit.proto import gateway_pb2_grpc as gateway_grpc
from stowaway.buildkit.proto import ops_pb2 as ops

__all__ = ["caps", "gateway", "gateway_grpc", "ops"]
