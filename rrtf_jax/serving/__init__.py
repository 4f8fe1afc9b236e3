"""Serving: the decode engine, the OpenAI API layer, the HTTP server (`rrtf serve`) and the
client of OpenAI-compatible teacher endpoints; imported on use."""
