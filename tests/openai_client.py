"""Drives a running Tabula coordinator with the official `openai` Python client.

Usage: python3 tests/openai_client.py BASE_URL API_KEY
Run by crates/cli/tests/cluster.rs against a real cluster (coordinator + workers); every check
raises on failure.
"""

import base64
import io
import json
import struct
import sys
import time

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=600)

models = {m.id for m in client.models.list().data}
assert {"all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"} <= models, models

# Embeddings: the client asks for base64 by default and decodes it.
texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
res = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
vectors = [d.embedding for d in res.data]
assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
for v in vectors:
    norm = sum(x * x for x in v) ** 0.5
    assert abs(norm - 1) < 1e-3, norm
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2]), "similar texts must be closer"
floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], encoding_format="float")
assert floats.data[0].embedding == vectors[0], "float and base64 encodings must agree exactly"
assert res.usage.prompt_tokens > 0

# Completions and chat, seeded: exact precision makes them reproducible.
a = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=6, seed=7, temperature=0.8)
b = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=6, seed=7, temperature=0.8)
assert a.choices[0].text == b.choices[0].text and a.choices[0].text, (a, b)
assert a.usage.completion_tokens == 6
chat = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=8,
    temperature=0,
)
answer = chat.choices[0].message.content
assert chat.choices[0].message.role == "assistant" and answer, chat
streamed = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=8,
    temperature=0,
    stream=True,
)
text, finish = "", None
for chunk in streamed:
    text += chunk.choices[0].delta.content or ""
    finish = chunk.choices[0].finish_reason or finish
assert text == answer and finish in ("stop", "length"), (text, answer, finish)

# Errors arrive as the client's typed exceptions.
for call, kind in [
    (lambda: client.embeddings.create(model="no-such-model", input="x"), openai.NotFoundError),
    (lambda: client.embeddings.create(model="all-MiniLM-L6-v2", input=[]), openai.BadRequestError),
    (lambda: client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=0), openai.BadRequestError),
    (
        lambda: openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
        and openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="all-MiniLM-L6-v2", input="x"
        ),
        openai.AuthenticationError,
    ),
]:
    try:
        call()
    except kind as e:
        assert e.body and e.body.get("message"), e
    else:
        raise AssertionError(f"expected {kind.__name__}")

# The Batch API: the same texts give the same bits as the synchronous endpoint.
lines = [
    {"custom_id": f"t{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "all-MiniLM-L6-v2", "input": t, "encoding_format": "float"}}
    for i, t in enumerate(texts)
]
lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/embeddings", "body": {"model": "all-MiniLM-L6-v2", "input": []}})
upload = client.files.create(file=("batch.jsonl", io.BytesIO("\n".join(json.dumps(l) for l in lines).encode())), purpose="batch")
batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
deadline = time.time() + 300
while batch.status != "completed":
    assert time.time() < deadline, batch
    time.sleep(0.5)
    batch = client.batches.retrieve(batch.id)
assert batch.request_counts.total == 4 and batch.request_counts.failed == 1, batch.request_counts
out = [json.loads(l) for l in client.files.content(batch.output_file_id).text.splitlines()]
by_id = {o["custom_id"]: o["response"]["body"]["data"][0]["embedding"] for o in out}
for i in range(3):
    assert by_id[f"t{i}"] == vectors[i], f"batch line t{i} differs from the synchronous result"
errors = [json.loads(l) for l in client.files.content(batch.error_file_id).text.splitlines()]
assert [e["custom_id"] for e in errors] == ["bad"] and errors[0]["error"]["message"], errors
print("openai client: all checks passed")
