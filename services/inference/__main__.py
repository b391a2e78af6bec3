"""`python -m services.inference --port N --metrics-port M` starts the inference service."""
from services.inference.server import main

# Guarded: worker processes started with forkserver/spawn import the main module again.
if __name__ == "__main__":
    main()
