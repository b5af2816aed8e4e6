"""`dgrt serve`: an OpenAI-compatible server (install with `pip install 'dgrt[serve]'`)."""
