"""gradserve server, in layers (docs/architecture.md): core, engine, transport, protocols,
multiproc, and their assembly (app, frontend, cli).
"""
