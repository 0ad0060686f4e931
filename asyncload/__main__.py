"""``python -m asyncload``: the command line (see ``python -m asyncload --help``)."""

if __name__ == "__main__":
    from ._cli.main import main

    raise SystemExit(main())
