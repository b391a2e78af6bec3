"""`python -m services.benchmark --port N --metrics-port M` starts the benchmark service."""
from services.benchmark.server import main

# Guarded: worker processes started with forkserver/spawn import the main module again.
if __name__ == "__main__":
    main()
