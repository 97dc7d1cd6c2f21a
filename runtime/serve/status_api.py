"""GET /r1serve/v1/status on the Ingress's HTTP app: per pool, running and desired replicas and the last
scaling decisions with their reasons (what `r1serve status` prints). Read-only, like /health."""

# No `from __future__ import annotations`: FastAPI reads the route's annotations (see ingress.py).
import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from ray import serve

from r1serve.spec import constants as C

from .status_board import STATUS_ROUTE, pool_status, read_board

router = APIRouter()
_POOL_OF = {name: pool for pool, name in C.POOL_DEPLOYMENTS.items()}


def _running_replicas() -> dict:
    app = serve.status().applications.get(C.SERVE_APP_NAME)
    if app is None:
        return {}
    return {_POOL_OF[name]: int(d.replica_states.get("RUNNING", 0))
            for name, d in app.deployments.items() if name in _POOL_OF}


@router.get(STATUS_ROUTE)
async def scaling_status() -> JSONResponse:
    board, running = await asyncio.gather(read_board(), asyncio.to_thread(_running_replicas))
    return JSONResponse(pool_status(board, running))
