"""`python -m umbra_grpc`: the `umbra-grpc` command."""

from umbra_grpc.cli import main

main()
