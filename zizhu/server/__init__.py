"""The OpenAI-compatible HTTP server: `build_app(async_engine, ServingConfig(...))` gives a FastAPI app.

    protocol.py      request/response shapes          serving.py   engine streams, SSE, shared checks
    serving_chat.py  /v1/chat/completions             serving_completion.py  /v1/completions
    reasoning.py     <think> splitting                tool_calls.py  DeepSeek tool-call parsing
    metrics.py       Prometheus, one registry per app app.py       routes, errors, API key
"""

from zizhu.server.app import build_app
from zizhu.server.serving import ServingConfig

__all__ = ["build_app", "ServingConfig"]
