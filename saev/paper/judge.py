"""LLaVA-Bench scoring with a judge model behind an OpenAI-compatible chat-completions endpoint.

LLaVA-Bench (Liu et al., 2024) asks GPT-4 to review two answers to each question: the
reference answer (GPT-4's own, "Assistant 1") and the model's ("Assistant 2"), given a text
context describing the image. The judge's first line holds two scores from 1 to 10; the
benchmark's *relative score* is ``100 * mean(model scores) / mean(reference scores)``, per
category and overall (``summarize_gpt_review.py``). :class:`Judge` sends the same kind of
request with the standard library only (``urllib``), retries transient failures and parses
the score pair; a reply without a score pair is an error, never a default score.

The endpoint and model come from the profile (``align.judge``); the API key from the
environment variable that ``align.judge.api_key_env`` names.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import NamedTuple

from saev.paper.profile import JudgeConfig

__all__ = ["SYSTEM_PROMPT", "Judge", "JudgeError", "Review", "parse_score_pair", "review_prompt"]

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
"""System message of every review request (LLaVA-Bench's reviewer)."""

_INSTRUCTION = (
    "We would like your feedback on the performance of two AI assistants answering the user question "
    "above. The user asks the question while looking at an image; the image's visual content is "
    "described for you in the context above.\n"
    "Rate the helpfulness, relevance, accuracy and level of detail of each response. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score means a better overall "
    "performance.\n"
    "First output a single line containing only the two scores, for Assistant 1 and Assistant 2 in this "
    "order, separated by a space.\n"
    "On the following lines, explain your evaluation, avoiding any bias and making sure that the order in "
    "which the responses were presented does not affect your judgment."
)

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_NUMBER = r"[-+]?\d+(?:\.\d+)?"


class JudgeError(RuntimeError):
    """The judge endpoint failed after all retries, or answered without a score pair."""


class Review(NamedTuple):
    """One judge review: the reference answer's and the model answer's scores (1-10) and the raw text."""

    reference_score: float
    answer_score: float
    text: str


def review_prompt(question: str, reference: str, answer: str, *, context: str = "") -> str:
    """The user message of one review: context, question, the two answers, the instruction.

    Assistant 1 is the reference answer and Assistant 2 the model's, as in LLaVA-Bench.
    """
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{_INSTRUCTION}\n\n"
    )


def parse_score_pair(text: str) -> tuple[float, float]:
    """The two scores on the first non-empty line of a review (``"8 6"``, ``"8, 6"``, ``"(8, 6)"``).

    Like LLaVA-Bench's ``parse_score``, the first line must hold exactly two numbers; unlike it,
    anything else raises :class:`JudgeError` instead of becoming the score pair (-1, -1).
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    cleaned = re.sub(r"[(),\[\]]", " ", first).strip()
    parts = cleaned.split()
    if len(parts) == 2 and all(re.fullmatch(_NUMBER, p) for p in parts):
        return float(parts[0]), float(parts[1])
    raise JudgeError(f"the judge's reply does not start with a line of two scores: {text[:200]!r}")


class Judge:
    """Client of one judge model (``JudgeConfig``): ``review(...)`` -> :class:`Review`."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._key = None
        if config.api_key_env is not None:
            self._key = os.environ.get(config.api_key_env)
            if not self._key:
                raise JudgeError(
                    f"align.judge.api_key_env names the environment variable {config.api_key_env!r}, which is "
                    "unset or empty; export the judge endpoint's API key there, or set api_key_env: null for "
                    "an endpoint that needs no key"
                )

    def request_body(self, prompt: str) -> dict:
        """The JSON body of one chat-completions request."""
        return {
            "model": self.config.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }

    def complete(self, prompt: str) -> str:
        """The judge's reply to ``prompt``, retrying connection errors, timeouts, HTTP 429 and 5xx."""
        data = json.dumps(self.request_body(prompt)).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last: str = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                time.sleep(self.config.retry_backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                body = e.read()[:300].decode(errors="replace")
                last = f"HTTP {e.code} from {self.url}: {body}"
                if e.code in _RETRY_STATUS:
                    continue
                raise JudgeError(last) from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"no response from {self.url}: {e}"
                continue
            return _message_content(payload, self.url)
        raise JudgeError(f"judge failed after {self.config.max_retries + 1} attempts; last error: {last}")

    def review(self, question: str, reference: str, answer: str, *, context: str = "") -> Review:
        """Score the reference answer and ``answer`` to ``question`` (see :func:`review_prompt`)."""
        text = self.complete(review_prompt(question, reference, answer, context=context))
        ref_score, ans_score = parse_score_pair(text)
        return Review(ref_score, ans_score, text)

    def review_all(
        self,
        questions: Sequence[str],
        references: Sequence[str],
        answers: Sequence[str],
        contexts: Sequence[str] | None = None,
    ) -> list[Review]:
        """:meth:`review` of every (question, reference, answer), in order."""
        contexts = [""] * len(questions) if contexts is None else contexts
        return [
            self.review(q, r, a, context=c) for q, r, a, c in zip(questions, references, answers, contexts, strict=True)
        ]


def _message_content(payload: bytes, url: str) -> str:
    try:
        reply = json.loads(payload)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise JudgeError(f"{url} did not answer with a chat completion: {payload[:200]!r}") from e
    if not isinstance(content, str):
        raise JudgeError(f"{url}: the completion's message content is not text: {content!r}")
    return content
