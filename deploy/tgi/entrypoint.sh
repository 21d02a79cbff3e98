#!/bin/bash
# TGI's /tgi-entrypoint.sh, plus one line: the shim directory goes first on PATH *after* the venv is
# activated (activation prepends the venv's bin, which holds TGI's own text-generation-server).
ldconfig 2>/dev/null || echo 'unable to refresh ld cache, not a big deal in most cases'
source /usr/src/.venv/bin/activate
export PATH="/opt/chameleon/bin:${PATH}"
exec text-generation-launcher "$@"
