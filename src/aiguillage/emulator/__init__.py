"""A vLLM-like backend emulator for scale tests without GPUs.

`engine` holds the scheduling model (continuous batching, load-dependent TTFT and
ITL, prefix caching, vLLM's metrics); `server` puts OpenAI-compatible HTTP in front
of it and runs many emulated engines in one process. See docs/emulator.md.
"""
