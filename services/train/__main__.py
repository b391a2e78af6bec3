"""`python -m services.train --port N --metrics-port M` starts the train service."""
from services.train.server import main

main()
