"""`python -m services.convert --port N --metrics-port M` starts the convert service."""
from services.convert.server import main

main()
