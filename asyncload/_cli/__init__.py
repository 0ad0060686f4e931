"""The command line, ``python -m asyncload``: ``bench`` (asyncload next to torch's
DataLoader on the user's own data) and ``demo`` (the same against a local slow server).

Private: nothing here is imported by ``import asyncload``. One module per job:

- :mod:`.main`: argument parsing and the two subcommands;
- :mod:`.sources`: what SOURCE names (URL list, directory, ``s3://`` prefix), listed once;
- :mod:`.runner`: each configuration in a fresh child process, its peak RSS sampled;
- :mod:`.measure`: the child side: builds one loader, times its batches;
- :mod:`.baselines`: the blocking map-style datasets the DataLoader baseline reads with;
- :mod:`.report`: the console table and the JSON file;
- :mod:`.demo_server`: the local HTTP server with injected latency, for ``demo``.
"""
