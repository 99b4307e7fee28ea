"""Example service behind an http handler (docker/router.yaml): the router
POSTs each `evaluation.completed` event here, body as published, metadata in
CloudEvents headers (ce-id, ce-type, ce-attempt, ...). The status it returns
tells the router what to do (docs/http.md has the whole table):

  2xx                      handled: the router acks the event
  503 (or 429) + Retry-After   not now: retried after that many seconds
  422, 400, 404, other 4xx     never processable: dead-lettered, the status and
                           the start of this body in the reason
  other 5xx, a timeout     retried with the queue's backoff

No broker client here: FastAPI and uvicorn only (Debian's packages).
"""
import os
from collections import OrderedDict

from fastapi import FastAPI, Header, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, confloat, constr

app = FastAPI(title="evaluation-service")
# Maintenance switch for the demo: while this file exists, answer 503.
MAINTENANCE_FILE = os.environ.get("MAINTENANCE_FILE", "/tmp/maintenance")

Id = constr(min_length=1, max_length=200)


class EvaluationCompleted(BaseModel):
    evaluation_id: Id
    dfn_id: Id
    score: confloat(ge=0, le=1)


class Event(BaseModel):
    """The envelope (snake_case, as the Python services publish it).
    A body that does not match gets FastAPI's 422: dead-lettered."""
    event_id: Id
    event_type: Id
    payload: EvaluationCompleted


# The router delivers at least once (a retry after a lost answer repeats an
# event): remember the last event ids and answer 200 to a repeat.
seen: "OrderedDict[str, None]" = OrderedDict()
scores: "dict[str, float]" = {}


@app.post("/events/evaluation.completed")
async def evaluation_completed(event: Event, ce_id: str = Header(...), ce_attempt: int = Header(1)):
    if os.path.exists(MAINTENANCE_FILE):
        # Retried by the router after 30 s (capped at its largest retry delay).
        return JSONResponse({"detail": "maintenance"}, status_code=503, headers={"Retry-After": "30"})
    if ce_id != event.event_id:
        return JSONResponse({"detail": "ce-id does not match event_id"}, status_code=400)
    if ce_id in seen:
        return Response(status_code=200)
    scores[event.payload.evaluation_id] = event.payload.score  # the service's own work
    seen[ce_id] = None
    if len(seen) > 10000:
        seen.popitem(last=False)
    print(f"evaluation {event.payload.evaluation_id!a:.80} score {event.payload.score} (attempt {ce_attempt})", flush=True)
    return Response(status_code=204)


@app.get("/healthz")
async def healthz():
    return {"ok": True}
