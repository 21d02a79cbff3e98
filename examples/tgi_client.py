"""Call the example server with huggingface_hub's InferenceClient, the maintained TGI client.

    python examples/tgi_api_server.py --model smollm2-135m-instruct --port 8080 &
    python examples/tgi_client.py --url http://127.0.0.1:8080 --prompt "The capital of France is"

One plain call (with details: finish reason, token ids, logprobs) and one streamed call that prints
tokens as the server produces them. `InferenceClient(base_url=URL)` posts both to `URL` itself
(TGI's `POST /`, `"stream": false|true`). For a server started with `--api-key-file FILE`, pass the same
file: the key is sent as `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import sys

from huggingface_hub import InferenceClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--api-key-file", default=None, help="file holding the server's API key")
    args = parser.parse_args(argv)

    api_key = None
    if args.api_key_file:
        with open(args.api_key_file) as f:
            api_key = f.read().strip()
    client = InferenceClient(base_url=args.url, api_key=api_key, timeout=120)

    out = client.text_generation(args.prompt, max_new_tokens=args.max_new_tokens, details=True)
    print(f"plain:  {out.generated_text!r}")
    print(f"        finish_reason={out.details.finish_reason} tokens={out.details.generated_tokens}")

    print("stream: ", end="", flush=True)
    for token in client.text_generation(args.prompt, max_new_tokens=args.max_new_tokens, stream=True):
        print(token, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
