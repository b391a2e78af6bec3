"""`python -m services.inference --port N --metrics-port M [--http-port H]` starts the inference service (gRPC, and
the REST API with --http-port)."""
from services.inference.server import main

# Guarded: worker processes started with forkserver/spawn import the main module again.
if __name__ == "__main__":
    main()
