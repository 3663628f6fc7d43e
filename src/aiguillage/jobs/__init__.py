"""Asynchronous speech-to-text jobs: states, options, pipeline steps, workers, webhooks."""
