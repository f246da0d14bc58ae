"""The servers stage 2 talks to, one module per kind, beside the request scheduler and the request cache."""
