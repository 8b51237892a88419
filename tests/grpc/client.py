#!/usr/bin/env python3
"""A real gRPC client (grpcio) for tollgate's backend tests: runs the calls named on the
command line against tollgate's TLS listener and prints one JSON object per call.

Usage: client.py TARGET CA_PEM AUTHORITY CALL... where CALL is one of
  unary:<text>  fail  slow:<ms>  stream:<n>  bidi:<n>  headers
"""
import json
import sys

import grpc


def main():
    target, ca, authority = sys.argv[1:4]
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    ch = grpc.secure_channel(
        target,
        creds,
        options=(
            ("grpc.ssl_target_name_override", authority),
            ("grpc.default_authority", authority),
        ),
    )
    grpc.channel_ready_future(ch).result(timeout=10)

    def call(name):
        kind, _, arg = name.partition(":")
        out = {"call": name}
        try:
            if kind in ("unary", "fail", "slow", "headers"):
                method = {"unary": "Unary", "fail": "Fail", "slow": "Slow", "headers": "Headers"}[kind]
                f = ch.unary_unary(f"/test.Echo/{method}")
                resp, c = f.with_call(arg.encode(), timeout=10)
                out["reply"] = resp.decode()
                out["trailers"] = dict(c.trailing_metadata() or ())
                out["code"] = c.code().name
            elif kind == "stream":
                f = ch.unary_stream("/test.Echo/ServerStream")
                it = f(arg.encode(), timeout=10)
                out["replies"] = [m.decode() for m in it]
                out["code"] = it.code().name
            elif kind == "bidi":
                # ping-pong: the next message is sent only after the answer to the last one
                # arrived, so a proxy that buffered the request body would stall here
                import queue

                q = queue.Queue()
                n = int(arg)

                def gen():
                    for i in range(n):
                        yield f"m{i}".encode()
                        if q.get(timeout=5) is None:
                            return

                f = ch.stream_stream("/test.Echo/Bidi")
                it = f(gen(), timeout=15)
                got = []
                for m in it:
                    got.append(m.decode())
                    q.put(m)
                out["replies"] = got
                out["code"] = it.code().name
            else:
                raise SystemExit(f"unknown call {name}")
        except grpc.RpcError as e:
            out["code"] = e.code().name
            out["details"] = e.details()
            out["trailers"] = dict(e.trailing_metadata() or ())
        print(json.dumps(out), flush=True)

    for name in sys.argv[4:]:
        call(name)


if __name__ == "__main__":
    sys.exit(main())
