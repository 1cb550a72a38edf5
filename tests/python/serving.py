"""What the Python clients share: waiting for a server to be ready."""
import time

import grpc


def wait_until_serving(address, seconds=240):
    """Polls grpc.health.v1 until the server is ready (its workers loaded the model).

    The health messages are tiny: an empty request (service ""), and status SERVING
    encoded as field 1 = 1.
    """
    check = grpc.insecure_channel(address).unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda m: m,
        response_deserializer=lambda m: m,
    )
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check(b"", timeout=5) == b"\x08\x01":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{address} was not serving after {seconds} s")
