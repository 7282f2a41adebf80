"""The answer's way to the client: one relay for every body, filters before, taps after."""
