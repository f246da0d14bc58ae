"""Reading the input: files, Hub datasets and in-memory ``Dataset`` objects into validated rows, every drop counted."""
