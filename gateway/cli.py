"""The ``refgw`` command line. Exit codes: 0 success, 1 failure, 2 usage error."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from gateway import __version__
from gateway.settings import Settings

app = typer.Typer(help="refgw: referral interoperability gateway (FHIR R4).",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"refgw {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """refgw: referral interoperability gateway (FHIR R4 Coordination Platform)."""


def _fail(message: str) -> None:
    typer.echo(f"refgw: error: {message}", err=True)
    raise typer.Exit(1)


def _safe_url(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
) -> None:
    """Run the gateway (migrates the embedded SQLite database and loads the demo network)."""
    import uvicorn

    from gateway.api.app import create_app
    from gateway.demo import load_demo
    from gateway.store.db import current_revision, head_revision, upgrade
    from gateway.store.repository import Store

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        store = Store(settings.database_url, pool_size=settings.db_pool_size,
                      default_page_size=settings.default_page_size,
                      max_page_size=settings.max_page_size)
        if store.dialect == "sqlite":
            upgrade(store.engine)  # the embedded default migrates itself
        elif current_revision(store.engine) != head_revision():
            _fail("the PostgreSQL schema is not current: run `refgw db upgrade` first")
        if settings.load_demo:
            n = load_demo(store)
            if n:
                typer.echo(f"refgw: loaded {n} demo resources", err=True)
    except typer.Exit:
        raise
    except Exception as exc:
        _fail(f"cannot open the database {_safe_url(settings.database_url)}: {exc}")
        return
    h, p = host or settings.host, port or settings.port
    typer.echo(f"refgw {__version__}: FHIR API on http://{h}:{p}  (database "
               f"{_safe_url(settings.database_url)})", err=True)
    typer.echo(f"  try: curl 'http://{h}:{p}/Organization?_count=5'", err=True)
    uvicorn.run(create_app(settings, store=store), host=h, port=p,
                log_level=settings.log_level.lower(), access_log=False)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations to REFGW_DATABASE_URL."""
    from gateway.store.db import current_revision, upgrade
    from gateway.store.repository import Store

    settings = Settings()
    try:
        store = Store(settings.database_url)
        upgrade(store.engine)
        typer.echo(f"database {_safe_url(settings.database_url)} at revision "
                   f"{current_revision(store.engine)}")
    except Exception as exc:
        _fail(f"migration failed: {exc}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
