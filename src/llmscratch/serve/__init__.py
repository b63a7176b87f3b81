"""An OpenAI-compatible HTTP server over one model (``llmscratch serve``); needs the ``serve`` extra
(FastAPI, uvicorn), which nothing outside this package imports."""
