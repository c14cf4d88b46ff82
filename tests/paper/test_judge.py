"""The LLaVA-Bench judge client (``saev.paper.judge``) against a stub OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import pytest

from saev.paper.profile import JudgeConfig
from saev.paper.judge import SYSTEM_PROMPT, Judge, JudgeError, parse_score_pair


class Stub(NamedTuple):
    """A running stub server: its base URL, the requests it received and its reply script."""

    base_url: str
    requests: list[dict]
    replies: list[tuple[int, str]]
    """(HTTP status, message content or raw body) consumed one per request; the last one repeats."""


def _completion(content: str) -> str:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def stub() -> Iterator[Stub]:
    requests: list[dict] = []
    replies: list[tuple[int, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
            status, text = replies.pop(0) if len(replies) > 1 else replies[0]
            payload = (_completion(text) if status == 200 and not text.startswith("RAW:") else text[4:]).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Stub(f"http://127.0.0.1:{server.server_address[1]}/v1", requests, replies)
    finally:
        server.shutdown()
        server.server_close()


def _judge(stub: Stub, **kw: object) -> Judge:
    cfg = JudgeConfig(base_url=stub.base_url, model="judge-model", api_key_env=None, timeout=5,
                      retry_backoff=0.01, **kw)  # fmt: skip
    return Judge(cfg)


def test_request_shape_and_parsed_scores(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUB_JUDGE_KEY", "secret-123")
    stub.replies.append((200, "8 6\nAssistant 1 is right; Assistant 2 misses the colour."))
    cfg = JudgeConfig(base_url=stub.base_url + "/", model="judge-model", api_key_env="STUB_JUDGE_KEY")
    review = Judge(cfg).review("What colour is the circle?", "red", "blue", context="A red circle.")
    assert (review.reference_score, review.answer_score) == (8.0, 6.0)
    assert review.text.startswith("8 6")
    (req,) = stub.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer secret-123"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.2 and body["max_tokens"] == 1024
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["role"] == "user"
    text = user["content"]
    # context, question, reference (Assistant 1) and the model's answer (Assistant 2), in LLaVA-Bench's order
    order = [text.index(s) for s in ("[Context]\nA red circle.", "[Question]\nWhat colour is the circle?",
                                     "[Assistant 1]\nred", "[Assistant 2]\nblue", "[System]")]  # fmt: skip
    assert order == sorted(order)


def test_retries_on_server_errors_then_succeeds(stub: Stub) -> None:
    stub.replies.extend([(500, "RAW:oops"), (503, "RAW:busy"), (200, "7, 9")])
    review = _judge(stub, max_retries=2).review("q", "ref", "ans")
    assert (review.reference_score, review.answer_score) == (7.0, 9.0)
    assert len(stub.requests) == 3


def test_gives_up_after_max_retries(stub: Stub) -> None:
    stub.replies.append((500, "RAW:down"))
    with pytest.raises(JudgeError, match="after 3 attempts.*HTTP 500"):
        _judge(stub, max_retries=2).review("q", "ref", "ans")
    assert len(stub.requests) == 3


def test_client_errors_are_not_retried(stub: Stub) -> None:
    stub.replies.append((401, 'RAW:{"error": "bad key"}'))
    with pytest.raises(JudgeError, match="HTTP 401.*bad key"):
        _judge(stub, max_retries=3).review("q", "ref", "ans")
    assert len(stub.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        (200, "Both answers are fine."),  # no score line
        (200, "8\nonly one score"),
        (200, "8 6 7"),
        (200, "RAW:not json at all"),
        (200, 'RAW:{"choices": []}'),
    ],
)
def test_garbage_is_an_error_never_a_score(stub: Stub, reply: tuple[int, str]) -> None:
    stub.replies.append(reply)
    with pytest.raises(JudgeError):
        _judge(stub, max_retries=0).review("q", "ref", "ans")


def test_unreachable_endpoint_is_retried_then_fails() -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=None, timeout=2,
                      max_retries=1, retry_backoff=0.01)  # fmt: skip
    with pytest.raises(JudgeError, match="after 2 attempts.*no response"):
        Judge(cfg).review("q", "ref", "ans")


def test_missing_api_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="NO_SUCH_JUDGE_KEY"):
        Judge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="NO_SUCH_JUDGE_KEY"))


@pytest.mark.parametrize(
    ("text", "pair"),
    [("8 6", (8.0, 6.0)), ("8,6\nwhy", (8.0, 6.0)), ("(7.5, 9)", (7.5, 9.0)), ("\n 3 10 \nmore", (3.0, 10.0))],
)
def test_parse_score_pair(text: str, pair: tuple[float, float]) -> None:
    assert parse_score_pair(text) == pair


def test_judge_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="align.judge.base_url"):
        JudgeConfig(base_url="127.0.0.1:8000", model="m")
    with pytest.raises(ValueError, match="align.judge.max_retries"):
        JudgeConfig(base_url="http://x", model="m", max_retries=-1)


def test_benchmark_scoring_through_the_judge(stub: Stub, monkeypatch: pytest.MonkeyPatch,
                                             make_image: Callable) -> None:  # fmt: skip
    """``evaluate_benchmark`` with ``align.judge``: one review per question, LLaVA-Bench's relative score."""
    import datasets

    from saev.paper import benchmark
    from saev.paper.profile import AlignConfig

    stub.replies.extend([(200, "8 4"), (200, "10 10"), (200, "6 3")])
    rows = {
        "image": [make_image(32, 32, seed=i) for i in range(3)],
        "question": ["Describe the image.", "What is it?", "Why?"],
        "answer": ["a red circle", "a circle", "because"],
        "category": ["detail", "conv", "conv"],
    }
    bench = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), **{k: datasets.Value("string") for k in ("question", "answer", "category")}}
    ))  # fmt: skip
    answers = {"Describe the image.": "a circle", "What is it?": "a circle", "Why?": "dunno"}
    monkeypatch.setattr(benchmark, "greedy_answers",
                        lambda loaded, samples, *a, **k: [answers[s.text.split("\n")[-1].split(" ASSISTANT")[0]]
                                                          for s in samples])  # fmt: skip
    cfg = AlignConfig(judge=JudgeConfig(base_url=stub.base_url, model="judge-model", api_key_env=None))
    result = benchmark.evaluate_benchmark(_FakeLoaded(), bench, config=cfg, family="llava_next")
    assert len(stub.requests) == 3
    assert result.scorer == "judge:judge-model"
    assert result.relative == {"detail": pytest.approx(50.0), "conv": pytest.approx(100 * 13 / 16)}
    assert result.overall == pytest.approx(100 * 17 / 24)
    assert result.exact_match == {"detail": 0.0, "conv": 0.5}


class _FakeLoaded:
    """Stands in for a LoadedModel where the answers are stubbed (only the tokenizer is used)."""

    family = "llava_next"

    def __init__(self) -> None:
        import torch

        self.model = torch.nn.Linear(1, 1)

        class Tok:
            def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
                return {"input_ids": text.split()}

        self.processor = Tok()
