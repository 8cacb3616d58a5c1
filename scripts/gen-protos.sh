#!/bin/sh
# Regenerate the committed Python stubs for every src/stowaway/**/proto/*.proto.
# Why grpcio-tools 1.51: its gencode imports under Debian bookworm's python3-protobuf 3.21 /
# python3-grpcio 1.51 (the BuildKit frontend image) as well as under the venv's protobuf 4.21.
# Protos declare import paths under stowaway/<pkg>/proto/, and we run protoc with -I src, so
# generated imports are absolute (`from stowaway.<pkg>.proto import x_pb2`).
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -c 'import grpc_tools, sys; v = __import__("grpc_tools.protoc").protoc; sys.exit(0)'
ver=$("$PY" -m pip show grpcio-tools 2>/dev/null | sed -n 's/^Version: //p')
case "$ver" in
  1.51.*) ;;
  *) echo "gen-protos: need grpcio-tools 1.51.x, found '${ver}'" >&2; exit 1 ;;
esac
protos=$(find src/stowaway -path '*/proto/*.proto' | sort)
[ -n "$protos" ] || { echo "gen-protos: no .proto files found" >&2; exit 1; }
# shellcheck disable=SC2086
"$PY" -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src $protos
echo "generated stubs for: $protos"
