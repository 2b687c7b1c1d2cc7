"""``layerkv-client``: send one prompt to the admission service and print the stream.

    layerkv-client "Once upon a time" --max-tokens 32

Generated text goes to stdout as it arrives; a summary (TTFT, TPOT, tokens, finish
reason, worker) goes to stderr. Exit status: 0 success, 1 the server refused or
failed the request (its status code and message are printed), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from layerkv.v1 import admission_pb2, admission_pb2_grpc, common_pb2

EXIT_RPC_ERROR = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="layerkv-client", description=__doc__.splitlines()[0])
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--target", default="localhost:50051", help="admission service host:port")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--slo-class", default="", help="SLO class (default: 'default')")
    p.add_argument("--request-id", default="")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    return p.parse_args(argv)


def build_request(args: argparse.Namespace) -> admission_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    if args.seed is not None:
        sampling.seed = args.seed
    return admission_pb2.GenerateRequest(
        request_id=args.request_id,
        prompt=args.prompt,
        sampling=sampling,
        slo_class=args.slo_class,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    request = build_request(args)
    with grpc.insecure_channel(args.target) as channel:
        stub = admission_pb2_grpc.AdmissionStub(channel)
        try:
            for response in stub.Generate(request, timeout=args.timeout):
                if response.HasField("decision"):
                    d = response.decision
                    kind = admission_pb2.DecisionKind.Name(d.kind).removeprefix("DECISION_KIND_")
                    print(
                        f"[{kind.lower()}] worker={d.worker or '-'} "
                        f"predicted_ttft={d.predicted_ttft_s * 1000:.1f} ms {d.reason}".rstrip(),
                        file=sys.stderr,
                    )
                elif response.HasField("tokens"):
                    sys.stdout.write(response.tokens.text)
                    sys.stdout.flush()
                elif response.HasField("completion"):
                    c = response.completion
                    sys.stdout.write("\n")
                    print(
                        f"[{response.request_id}] ttft={c.ttft_s * 1000:.1f} ms "
                        f"tpot={c.tpot_s * 1000:.1f} ms "
                        f"tokens={c.usage.prompt_tokens}+{c.usage.completion_tokens} "
                        f"finish={common_pb2.FinishReason.Name(c.finish_reason)} "
                        f"worker={c.worker}",
                        file=sys.stderr,
                    )
        except grpc.RpcError as e:
            retry = dict(e.trailing_metadata() or ()).get("retry-after-ms")
            hint = f" (retry after {retry} ms)" if retry else ""
            print(f"\nerror: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
            return EXIT_RPC_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
