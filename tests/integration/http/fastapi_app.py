"""The FastAPI service of test_http_push.py (run under uvicorn).

Appends one JSON line per request to $RECORD_FILE (time, raw path, raw
headers, body, client port), then answers as the event's payload says:
`payload.steps` is a list of answers, one per attempt (the `ce-attempt`
header; the last one repeats), each {status, body, json, content_type,
retry_after, sleep_ms}. Default: 200 with an empty body."""
import asyncio
import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

app = FastAPI()
RECORD_FILE = os.environ["RECORD_FILE"]


@app.post("/{path:path}")
async def receive(path: str, request: Request):
    body = await request.body()
    attempt = int(request.headers.get("ce-attempt", "1"))
    with open(RECORD_FILE, "a") as f:
        f.write(json.dumps({
            "time": time.time(), "raw_path": request.scope["raw_path"].decode("latin-1"),
            "query": request.scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]],
            "body": body.decode("utf-8", "replace"), "client_port": request.client.port,
            "attempt": attempt}) + "\n")
    try:
        steps = json.loads(body).get("payload", {}).get("steps") or [{}]
    except (ValueError, AttributeError):
        steps = [{}]
    step = steps[min(attempt, len(steps)) - 1]
    if step.get("sleep_ms"):
        await asyncio.sleep(step["sleep_ms"] / 1000)
    headers = {"Retry-After": str(step["retry_after"])} if "retry_after" in step else {}
    status = step.get("status", 200)
    if "json" in step:
        return JSONResponse(step["json"], status_code=status, headers=headers)
    return Response(step.get("body", ""), status_code=status, headers=headers,
                    media_type=step.get("content_type", "text/plain"))
