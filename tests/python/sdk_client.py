"""Talks to a running carewall gateway with the official `openai` package.

Run by tests/python_sdk.rs against the scripted mock upstream (see that
file for which user message gets which reply). Exits non-zero with a message
on the first failed check.
"""

import os
import sys

import openai
from openai import OpenAI

BASE = os.environ["CAREWALL_BASE_URL"]
SAFE = "I hear you. That sounds really hard. I'm here with you."


def client(policy="default"):
    return OpenAI(base_url=BASE, api_key="client-key", max_retries=0,
                  default_headers={"x-carewall-policy": policy})


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def verdict(obj):
    return (obj.to_dict() or {}).get("moderation")


def stream(c, user):
    text, finish, v = "", None, None
    for chunk in c.chat.completions.create(
            model="mock-model", stream=True, messages=[{"role": "user", "content": user}]):
        check(chunk.object == "chat.completion.chunk", "chunk object type")
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
            if choice.finish_reason:
                finish = choice.finish_reason
        v = verdict(chunk) or v
    return text, finish, v


for policy, mode in [("default", "window"), ("buffer", "buffer"),
                     ("observe", "observe"), ("strict", "buffer")]:
    c = client(policy)
    text, finish, v = stream(c, "safe please")
    check(text == SAFE, f"{policy}: safe text streamed intact, got {text!r}")
    check(finish == "stop", f"{policy}: finish_reason stop, got {finish}")
    check(v is not None and v["action"] == "allow" and v["streaming"] == mode,
          f"{policy}: verdict on the final chunk, got {v}")
    check(v["output"]["results"][0]["category_scores"].keys() >= {"toxic_language", "safe_response"},
          f"{policy}: all scores present")

    text, finish, v = stream(c, "toxic please")
    if policy == "observe":
        check("pathetic" in text, "observe passes text through")
        check(v["action"] == "annotate" and v["shadow"][0]["action"] == "block", f"observe verdict {v}")
    else:
        check("pathetic" not in text, f"{policy}: flagged text withheld, got {text!r}")
        check("crisis line" in text, f"{policy}: safe reply sent, got {text!r}")
        check(finish == "content_filter", f"{policy}: content_filter, got {finish}")
        check(v["action"] == "block" and v["category"] == "toxic_language", f"{policy}: verdict {v}")

    r = c.chat.completions.create(model="mock-model",
                                  messages=[{"role": "user", "content": "toxic please"}])
    v = verdict(r)
    check(r.object == "chat.completion", "completion object type")
    if policy != "observe":
        check("pathetic" not in r.choices[0].message.content, f"{policy}: non-streaming remedied")
        check(r.choices[0].finish_reason == "content_filter", f"{policy}: non-streaming finish")
    check(v["request_id"] and v["policy"] == policy, f"{policy}: verdict names policy, got {v}")

# Retry: the first answer is nonsense, the steered second one is fine.
r = client().chat.completions.create(model="mock-model",
                                     messages=[{"role": "user", "content": "nonsense please"}])
v = verdict(r)
check(r.choices[0].message.content == SAFE, f"retry answer, got {r.choices[0].message.content!r}")
check(v["action"] == "retry" and v["retries"] == 1, f"retry verdict {v}")

# The raw response carries the request id header.
raw = client().chat.completions.with_raw_response.create(
    model="mock-model", messages=[{"role": "user", "content": "safe please"}])
check(raw.headers.get("x-carewall-request-id"), "x-carewall-request-id header")
check(verdict(raw.parse())["request_id"] == raw.headers["x-carewall-request-id"], "request id matches")

# A stream cut mid-way surfaces as an error, not a silently short answer.
try:
    stream(client(), "cut please")
    check(False, "cut stream raised")
except openai.APIError as e:
    check("upstream" in str(e), f"cut stream error message: {e}")

# Upstream failure: an OpenAI-shaped error the SDK turns into an exception.
try:
    client().chat.completions.create(model="mock-model",
                                     messages=[{"role": "user", "content": "error500 please"}])
    check(False, "upstream 500 raised")
except openai.APIStatusError as e:
    check(e.status_code == 502, f"status 502, got {e.status_code}")
    check(e.body and e.body.get("code") == "upstream_server_error", f"error body {e.body}")

# /v1/moderations through the SDK.
m = client().moderations.create(input="You are pathetic.", extra_body={"context": "[seeker]I feel alone."})
d = m.to_dict()
check(d["results"][0]["flagged"] is True, f"moderations flagged: {d}")
check(d["results"][0]["category"] == "toxic_language", f"moderations category: {d}")
check(len(d["results"][0]["category_scores"]) == 8, "moderations: 8 scores")

print("python openai checks passed")
