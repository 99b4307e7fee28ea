"""The benchmark's trivial endpoint as a service would write it: FastAPI
under uvicorn (Debian's python3-fastapi and python3-uvicorn), one process,
200 with an empty body. Same interface as server.cpp: `server_fastapi.py PORT`,
prints "listening PORT", and "requests N" once SIGTERM has stopped it."""
import socket
import sys

import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI()
requests = 0


@app.post("/events/{event_type}")
async def event(event_type: str, request: Request):
    global requests
    await request.body()
    requests += 1
    return Response(status_code=200)


sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
sock.listen(1024)  # before "listening": a request may come at once
print("listening", sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=60)).run(sockets=[sock])
print("requests", requests, flush=True)
