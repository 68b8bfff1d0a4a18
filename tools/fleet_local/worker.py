"""One local "Lambda execution environment": a process that imports a handler once
and invokes it for each event it is sent, warm across invocations, with only its
own function's environment. Events arrive one JSON line at a time on stdin; each
answer is one JSON line on the protocol pipe. Whatever the handler prints goes to
stderr, as it would go to CloudWatch Logs.

    python -m fleet_local.worker CODE_URI HANDLER FUNCTION_NAME TIMEOUT_S MEMORY_MB
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    code_uri, handler_path, function_name, timeout_s, memory_mb = argv
    # The protocol gets the real stdout; the handler's prints go to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path.insert(0, str(Path(code_uri)))
    module_name, _, attr = handler_path.rpartition(".")
    from fleet_local.api import LocalLambdaContext

    try:
        handler = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - reported as Lambda reports an init error
        proto.write(json.dumps({"ok": False, "error": f"init: {type(exc).__name__}: {exc}"}) + "\n")
        return 1
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        context = LocalLambdaContext(
            function_name=function_name,
            timeout_s=float(timeout_s),
            memory_limit_in_mb=int(memory_mb),
            aws_request_id=request.get("request_id") or LocalLambdaContext().aws_request_id,
        )
        answer: dict[str, Any]
        try:
            answer = {"ok": True, "result": handler(request["event"], context)}
        except Exception as exc:  # noqa: BLE001 - Lambda returns errors as a payload
            answer = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "errorType": type(exc).__name__,
                "stackTrace": traceback.format_exc().splitlines(),
            }
        proto.write(json.dumps(answer, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
