"""A job's HTML report, read only from the path the service derives from the job's id."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, Response

from triggers.jobs import queue
from triggers.routes.state import ServiceState, read_access, report_file


def reports_router(state: ServiceState) -> APIRouter:
    router = APIRouter()

    @router.get("/reports/{job_id}", summary="A job's HTML report", response_class=HTMLResponse,
                dependencies=read_access(state))
    def report(job_id: str) -> Response:
        job = queue.get_job(state.engine, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        path = report_file(state, job.id)   # never a path from the job's record or a runner
        if not path.is_file():
            raise HTTPException(404, f"job {job_id} has no report yet (state: {job.state})")
        return FileResponse(path, media_type="text/html")

    return router
