"""Prompts as the WebUI reads them, encoded by sdbatch itself."""
