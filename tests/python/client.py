"""The README's Python client, as CI runs it against `bd3lm serve` (run.sh).

The client is the README's own code block (under "**Python.**"), run as written with the
server's address put in; then its session is checked, continued and compared, and an
unknown session must be NOT_FOUND. Stubs are generated from proto/ by run.sh into
$BD3LM_STUBS; the address is the first argument.
"""
import os
import pathlib
import sys
import textwrap

import grpc

from serving import wait_until_serving

sys.path.insert(0, os.environ["BD3LM_STUBS"])
from bd3lm.v1 import generation_pb2 as pb  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def readme_client():
    """The indented code block of the README's Python paragraph."""
    text = README.read_text().split("**Python.**", 1)[1]
    start = text.index("\n    import grpc")
    block = []
    for line in text[start + 1 :].splitlines():
        if line and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


address = sys.argv[1]
wait_until_serving(address)
code = readme_client()
assert "127.0.0.1:50051" in code, code
run = {}
exec(compile(code.replace("127.0.0.1:50051", address), "README.md", "exec"), run)
print()
client, first = run["client"], run["first"]

assert len(first.session_id) == 32 and first.token_ids, first
assert first.stop_reason == pb.STOP_REASON_MAX_TOKENS, first.stop_reason
session = client.GetSession(pb.GetSessionRequest(session_id=first.session_id))
assert len(session.token_ids) >= len(first.token_ids) + 16, len(session.token_ids)
again = client.Generate(pb.GenerateRequest(text="The state of the Union", max_new_tokens=32, seed=1))
assert again.token_ids == first.token_ids, "the same seed gave other tokens"
try:
    client.GetSession(pb.GetSessionRequest(session_id="0" * 32))
    raise AssertionError("an unknown session was found")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e.code()
    assert e.details().startswith("session_id:"), e.details()
print("the README's Python client: generation, continuation, same seed, NOT_FOUND: ok")
