"""Real-time chat server: ``python -m moshi.server``.

Speaks the WebSocket protocol of Kyutai's clients (see :mod:`moshi.server.protocol`), serves several
conversations through one batched generator (:mod:`moshi.server.engine`) on an 80 ms frame clock
(:mod:`moshi.server.frame_loop`), and ships its own web page (``static/``).
"""
