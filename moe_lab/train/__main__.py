"""``python -m moe_lab.train ...``: the command line of ``moe_lab.train.cli``."""

from moe_lab.train.cli import main

main()
