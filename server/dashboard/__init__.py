"""The live view of a run directory: `fedshield status RUN_DIR` (terminal) and
`fedshield dashboard RUN_DIR` (a read-only page in the browser).

Where the code is, and why there:
    summary.py   pure Python: a run directory -> a typed, frozen `RunSummary` (both commands
                 use it; no web framework imported), with the ledger verification cached
    app.py       the Starlette app: the page, /api/summary, /api/events (server-sent
                 events, pushed when a watched file's stat changes), its own static assets
    cli.py       the two commands' argument parsing (registered in simulations/cli.py)
    static/      the page, its script and style, and uPlot (vendored, MIT, LICENSE beside it)

They live in server/ because they read what the coordinator writes (server/run_dir.py) and
verify its ledger with fedshield.privacy; simulations/ (the CLI) only registers them.
"""
