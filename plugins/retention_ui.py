"""The Airflow 3 UI plugin: a "Retention" entry in the navigation listing runs with their headline
figures, and a link on each DAG run to its report. Every page requires an authenticated Airflow
user (Airflow's own token, header or cookie): an anonymous request gets 401."""

# No `from __future__ import annotations`: FastAPI must see the real GetUserDep annotation.
from airflow.plugins_manager import AirflowPlugin


def _app():
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse

    from airflow.api_fastapi.core_api.security import GetUserDep

    app = FastAPI(title="Retention reports", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def runs(user: GetUserDep) -> str:
        from retention.ui_pages import runs_page

        return runs_page()

    @app.get("/runs/{run_id:path}", response_class=HTMLResponse)
    def run(run_id: str, user: GetUserDep) -> str:
        from retention.ui_pages import run_page

        page = run_page(run_id)
        if page is None:
            raise HTTPException(404, f"no enforced retention run {run_id!r} is recorded")
        return page

    return app


class RetentionPlugin(AirflowPlugin):
    name = "retention"
    fastapi_apps = [{"app": _app(), "url_prefix": "/retention", "name": "Retention reports"}]
    external_views = [
        {"name": "Retention", "href": "retention/", "destination": "nav", "url_route": "retention"},
        {"name": "Retention report", "href": "retention/runs/{RUN_ID}", "destination": "dag_run"},
    ]
