"""A job's HTML report, read only from the path the service derives from the job's id.

A report is untrusted content: a runner uploads it and a PR's code may have written it. It is served
sandboxed (an opaque origin, no scripts, no forms) and may load nothing but its own inline images and
styles, so it cannot act with the read token a maintainer's browser sends to this origin.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, Response

from triggers.jobs import queue
from triggers.routes.state import ServiceState, read_access, report_file

REPORT_POLICY = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'none'; " \
                "frame-ancestors 'none'; base-uri 'none'"


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
        return FileResponse(path, media_type="text/html", headers={
            "Content-Security-Policy": REPORT_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cross-Origin-Resource-Policy": "same-origin"})

    return router
