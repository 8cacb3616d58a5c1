#!/bin/sh
# Regenerate the committed Python stubs for every src/stowaway/**/proto/*.proto.
# Why grpcio-tools 1.51 (protoc 3.21): its gencode imports under Debian's python3-protobuf
# 3.21 / python3-grpcio 1.51 (the BuildKit frontend image, Debian 12 and 13) as well as
# under the venv's current grpcio/protobuf. It has wheels for Python <= 3.11 only, so this
# script makes its own throwaway venv with such a Python ($PYTHON, default python3.11).
# Protos declare import paths under stowaway/<pkg>/proto/, and we run protoc with -I src, so
# generated imports are absolute (`from stowaway.<pkg>.proto import x_pb2`).
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || { echo "gen-protos: need $PY (grpcio-tools 1.51 has no wheel for newer Pythons); set PYTHON" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q 'grpcio-tools==1.51.3'
protos=$(find src/stowaway -path '*/proto/*.proto' | sort)
[ -n "$protos" ] || { echo "gen-protos: no .proto files found" >&2; exit 1; }
# shellcheck disable=SC2086
"$work/venv/bin/python" -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src $protos
echo "generated stubs for: $protos"
