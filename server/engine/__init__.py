"""The engine: the only code of the server that imports TensorFlow (checked by `make lint`):
loading model files, choosing the device, the compiled output and derivative functions, and
the offline training of the bundled models. Importing this package imports nothing heavy.
"""
