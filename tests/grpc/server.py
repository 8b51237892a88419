#!/usr/bin/env python3
"""A real gRPC server (grpcio) for tollgate's backend tests, without generated code: the
methods take and return raw bytes.

  /test.Echo/Unary       echo the request; trailing metadata x-echo-trailer: <len>
  /test.Echo/Fail        abort with NOT_FOUND, "no such thing"
  /test.Echo/Slow        sleep <request as ms> then echo
  /test.Echo/ServerStream  request "N": N messages "msg-0" … "msg-{N-1}"
  /test.Echo/Bidi        echo each message as it comes (ping-pong: the client waits for each)
  /test.Echo/Headers     echo the invocation metadata as "k=v\\n" lines
  /grpc.health.v1.Health/Check  SERVING, or NOT_SERVING while the file --serving-file says 0

Usage: server.py --port P [--tls CERT KEY] [--serving-file F]; prints "ready" when listening.
"""
import argparse
import os
import sys
import time
from concurrent import futures

import grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    ap.add_argument("--serving-file")
    a = ap.parse_args()

    def unary(req, ctx):
        ctx.set_trailing_metadata((("x-echo-trailer", str(len(req))),))
        return req

    def fail(req, ctx):
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def slow(req, ctx):
        time.sleep(int(req.decode() or "0") / 1000.0)
        return req

    def server_stream(req, ctx):
        for i in range(int(req.decode())):
            yield f"msg-{i}".encode()

    def bidi(reqs, ctx):
        for r in reqs:
            yield b"echo:" + r

    def headers(req, ctx):
        return "".join(f"{k}={v}\n" for k, v in ctx.invocation_metadata()).encode()

    def health(req, ctx):
        serving = True
        if a.serving_file and os.path.exists(a.serving_file):
            with open(a.serving_file) as f:
                serving = f.read().strip() != "0"
        # HealthCheckResponse { status = 1 SERVING | 2 NOT_SERVING }
        return bytes([0x08, 1 if serving else 2])

    ident = dict(request_deserializer=None, response_serializer=None)
    echo = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **ident),
            "Fail": grpc.unary_unary_rpc_method_handler(fail, **ident),
            "Slow": grpc.unary_unary_rpc_method_handler(slow, **ident),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **ident),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **ident),
            "Headers": grpc.unary_unary_rpc_method_handler(headers, **ident),
        },
    )
    hc = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(health, **ident)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((echo, hc))
    addr = f"127.0.0.1:{a.port}"
    if a.tls:
        with open(a.tls[0], "rb") as c, open(a.tls[1], "rb") as k:
            creds = grpc.ssl_server_credentials(((k.read(), c.read()),))
        server.add_secure_port(addr, creds)
    else:
        server.add_insecure_port(addr)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
