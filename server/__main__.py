"""``python -m server``: run one API replica."""

from server.main import main

main()
