"""A stub LLaVA-Bench judge on loopback: an OpenAI-compatible ``POST .../chat/completions`` that reviews
the two answers of ``saev.paper.judge.review_prompt`` by word overlap, so the rehearsal exercises the
real HTTP client, its retries and its parser without a judge model.

Scores: Assistant 1 (the reference) gets 10; Assistant 2 gets ``1 + 9 * F1`` of its words against the
reference's, rounded to one decimal. Deterministic; it says nothing about quality. Standard library only.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["stub_review", "serve", "start"]

_SECTION = r"\[{name}\]\n(.*?)\n\n\[End of {name}\]"


def _words(text: str) -> Counter:
    return Counter(re.findall(r"[a-z0-9]+", text.lower()))


def stub_review(prompt: str) -> str:
    """The review text for one ``review_prompt``: the score line, then one line of explanation."""
    found = [re.search(_SECTION.format(name=f"Assistant {i}"), prompt, re.S) for i in (1, 2)]
    if not all(found):
        raise ValueError("not a LLaVA-Bench review prompt: no [Assistant 1] / [Assistant 2] sections")
    ref, ans = (_words(m.group(1)) for m in found)
    common = sum((ref & ans).values())
    f1 = 0.0 if not common else 2 * common / (sum(ref.values()) + sum(ans.values()))
    return f"10 {1 + 9 * f1:.1f}\nStub judge (saev.rehearsal): word-overlap F1 {f1:.3f} against the reference."


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not self.path.rstrip("/").endswith("/chat/completions"):
                raise ValueError(f"unknown path {self.path}")
            prompt = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
            payload = {"id": "stub", "object": "chat.completion", "model": body.get("model", "stub"),
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": stub_review(prompt)}}]}  # fmt: skip
            status = 200
        except (ValueError, KeyError, StopIteration, TypeError) as e:
            payload, status = {"error": {"message": str(e)}}, 400
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def start(port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve the stub in a daemon thread; ``server.server_address[1]`` is the port (0: any free one).
    Stop it with ``server.shutdown()``."""
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="saev-judge-stub").start()
    return server


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve the stub in this thread until interrupted (``python -m saev.rehearsal judge``)."""
    server = ThreadingHTTPServer((host, port), _Handler)
    print(f"stub judge on http://{host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
