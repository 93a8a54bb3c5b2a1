"""Generated code for the gradserve.v1 protocol (see gradserve.proto)."""
