"""``buildllm serve``: an OpenAI-compatible HTTP server with continuous batching, and a chat page.

    batching.py     the engine: requests join and leave one shared KV cache between decoding steps
    text.py         a request's tokens as text pieces, cut at its stop strings
    protocol.py     the OpenAI request bodies, checked, and OpenAI's error object
    app.py          the FastAPI application: routes, streaming, limits, the API key, the chat page
    config.py       ``ServeConfig``, the server's knobs (and ``ServeOptions``, the command's)
    server.py       ``run_server``: uvicorn, the address, Ctrl-C
"""
