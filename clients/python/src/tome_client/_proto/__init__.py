"""Generated gRPC stubs of tome's public API (scripts/gen_python_stubs.sh writes them)."""
