"""`python -m services.benchmark --port N --metrics-port M` starts the benchmark service."""
from services.benchmark.server import main

main()
