"""``python -m memit`` (and ``torchrun -m memit``): the command line."""
from memit.cli import main

main()
