"""A remote HTTP reward endpoint, with timeouts and bounded retries.

Protocol: POST JSON `{"prompts": [...], "responses": [...], <column>: [...]}` and receive
`{"rewards": [float | null, ...]}`, one per sample. After `max_retries` failed retries the
whole batch counts as unscorable (None), and the job goes on.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from rayrlhf.rewards.functions import _clean

log = logging.getLogger(__name__)


def score_with_http(
    url: str,
    prompts: list[str],
    responses: list[str],
    columns: dict[str, list],
    timeout_s: float = 30.0,
    max_retries: int = 2,
    backoff_s: float = 0.5,
    token: str | None = None,
) -> list[float | None]:
    """POST the batch to `url`; retry transient failures with exponential back-off.

    `token` (from the environment variable named by reward.auth_token_env) is sent as a bearer token.
    """
    body = json.dumps({"prompts": prompts, "responses": responses, **columns}).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    last_error: Exception | None = None
    for attempt in range(max_retries + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                rewards = json.loads(resp.read())["rewards"]
            if len(rewards) != len(prompts):
                raise ValueError(f"endpoint returned {len(rewards)} rewards for {len(prompts)} samples")
            return [_clean(r) for r in rewards]
        except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError) as exc:
            last_error = exc
            if attempt < max_retries:
                time.sleep(backoff_s * 2**attempt)
    shown = urlsplit(url)._replace(query="", fragment="").geturl()  # a query string may carry a token
    log.warning("reward endpoint %s failed %d times (%r); %d samples unscored", shown, max_retries + 1, last_error, len(prompts))
    return [None] * len(prompts)
