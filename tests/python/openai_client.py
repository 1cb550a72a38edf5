"""The official `openai` package against `bd3lm serve --http-addr`, as CI runs it (run.sh).

Arguments: the HTTP address, the gRPC address, an API key of the server. The server runs
with `--max-streams-per-key 1`, so a generation that still runs makes the next one 429.
"""
import json
import os
import sys
import time
import urllib.request

import grpc
import openai
from openai import OpenAI

from serving import wait_until_serving

sys.path.insert(0, os.environ["BD3LM_STUBS"])
from bd3lm.v1 import generation_pb2 as pb, generation_pb2_grpc as rpc  # noqa: E402

http, address, key = sys.argv[1:4]
wait_until_serving(address)
client = OpenAI(base_url=f"http://{http}/v1", api_key=key, max_retries=0)
PROMPT = "The state of the Union"


def refused(call, error, param=None):
    """Runs `call`, which must raise `error` naming `param` (when given)."""
    try:
        call()
    except error as e:
        if param is not None:
            assert e.body["param"] == param, e.body
        return e
    raise AssertionError(f"expected {error.__name__}")


# What is served; the health path answers without a key.
with urllib.request.urlopen(f"http://{http}/health", timeout=30) as health:
    assert json.load(health)["status"] == "ok"
models = [m.id for m in client.models.list().data]
assert len(models) == 1, models
model = models[0]
assert client.models.retrieve(model).id == model

# Plain and streamed completions of one seed give one text, which gRPC gives too.
plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=32, seed=1)
text = plain.choices[0].text
assert text and plain.choices[0].finish_reason == "length", plain
assert plain.usage.completion_tokens == 32, plain.usage
assert plain.usage.total_tokens == plain.usage.prompt_tokens + 32, plain.usage
stream = client.completions.create(
    model=model, prompt=PROMPT, max_tokens=32, seed=1, stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
streamed = "".join(c.choices[0].text for c in chunks if c.choices)
assert streamed == text, (streamed, text)
assert chunks[-1].usage.completion_tokens == 32, chunks[-1]
assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
grpc_client = rpc.GenerationStub(grpc.insecure_channel(address))
auth = [("authorization", f"Bearer {key}")]
over_grpc = grpc_client.Generate(
    pb.GenerateRequest(text=PROMPT, max_new_tokens=32, seed=1), metadata=auth
)
assert over_grpc.text == text, (over_grpc.text, text)

# The session continues by its id, a block diffusion control beside OpenAI's fields.
session = plain.session_id
more = client.completions.create(
    model=model, prompt="", max_tokens=8, extra_body={"session_id": session, "steps": 2}
)
assert more.session_id == session and more.usage.completion_tokens == 8, more

# Refusals, in OpenAI's shape.
refused(lambda: client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}]
), openai.BadRequestError, "messages")
wrong = OpenAI(base_url=f"http://{http}/v1", api_key="not-a-key-0123456789", max_retries=0)
refused(lambda: wrong.models.list(), openai.AuthenticationError)
refused(lambda: client.completions.create(model="nope", prompt=PROMPT), openai.NotFoundError, "model")
refused(lambda: client.completions.create(
    model=model, prompt=PROMPT, temperature=-1
), openai.BadRequestError, "temperature")
refused(lambda: client.completions.create(
    model=model, prompt=PROMPT, logprobs=2
), openai.BadRequestError, "logprobs")

# A client that goes away mid-stream stops its generation: the key's one stream is free
# again (a bound, not a speed: the generation would run for minutes), and the session
# ended far short of its budget.
long = client.completions.create(
    model=model, prompt=PROMPT, max_tokens=8000, stream=True, extra_body={"steps": 64}
)
first = next(iter(long))
long.close()
deadline = time.monotonic() + 120
while True:
    try:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=1)
        break
    except openai.RateLimitError:
        assert time.monotonic() < deadline, "the abandoned stream still holds the key's slot"
        time.sleep(0.2)
info = grpc_client.GetSession(pb.GetSessionRequest(session_id=first.session_id), metadata=auth)
assert len(info.token_ids) < info.prompt_tokens + 8000, len(info.token_ids)
print("the openai package: models, completions plain and streamed, gRPC parity, "
      "continuation, 400/401/404, disconnect: ok")
