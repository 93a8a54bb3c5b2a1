"""gradserve server: engine, batcher, servicers and their assembly."""
