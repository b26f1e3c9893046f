"""The ``refgw`` command line. Exit codes: 0 success, 1 failure, 2 usage error."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway import __version__
from gateway.settings import Settings
from gateway.workflow.validation import format_policy

app = typer.Typer(help="refgw: referral interoperability gateway (FHIR R4).",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
clients_app = typer.Typer(help="Register and manage API clients (SMART Backend Services).",
                          no_args_is_help=True)
app.add_typer(clients_app, name="clients")
keys_app = typer.Typer(help="refgw's own token-signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
audit_app = typer.Typer(help="The audit trail: export and retention.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


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
    workers: Annotated[int | None, typer.Option(
        min=1, help="Server processes (REFGW_WORKERS; default: one per CPU on PostgreSQL, "
                    "1 on SQLite).")] = None,
) -> None:
    """Run the gateway (migrates the embedded SQLite database and loads the demo network)."""
    import uvicorn

    from gateway.api.app import create_app, prepare
    from gateway.auth.clients import ClientRegistry
    from gateway.demo import load_demo
    from gateway.demo.clients import ensure_demo_clients
    from gateway.store.db import current_revision, head_revision, upgrade
    from gateway.store.repository import Store

    settings = Settings()
    if workers is not None:
        settings.workers = workers
    n_workers = settings.effective_workers
    h, p = host or settings.host, port or settings.port
    # before loading anything or printing how to call the server: can it listen at all?
    problem = _cannot_listen(h, p)
    if problem:
        _fail(problem)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # What must happen once happens here, in this process, before any worker starts: the
    # SQLite migration, the signing key, the demo network, clients, keys and referrals.
    try:
        store = Store(settings.database_url, pool_size=settings.db_pool_size,
                      default_page_size=settings.default_page_size,
                      max_page_size=settings.max_page_size)
        if store.dialect == "sqlite":
            upgrade(store.engine)  # the embedded default migrates itself
        elif current_revision(store.engine) != head_revision():
            _fail("the PostgreSQL schema is not current: run `refgw db upgrade` first")
        demo_clients: list[tuple[str, Any]] = []
        if settings.load_demo:
            n = load_demo(store)
            if n:
                typer.echo(f"refgw: loaded {n} demo resources", err=True)
            if not settings.auth_disabled:
                demo_clients = ensure_demo_clients(ClientRegistry(store.engine),
                                                   Path(settings.demo_keys_dir))
        prepare(settings, store)
    except typer.Exit:
        raise
    except Exception as exc:
        _fail(f"cannot open the database {_safe_url(settings.database_url)}: {exc}")
        return
    processes = f"{n_workers} worker processes" if n_workers > 1 else "1 process"
    typer.echo(f"refgw {__version__}: FHIR API on http://{h}:{p}  (database "
               f"{_safe_url(settings.database_url)}; {processes})", err=True)
    if settings.auth_disabled:
        typer.echo("refgw: WARNING: auth is disabled (REFGW_AUTH_DISABLED=true); every caller "
                   "can read and change everything", err=True)
        typer.echo(f"  try: curl 'http://{h}:{p}/Organization?_count=5'", err=True)
    elif demo_clients:
        cid, key = demo_clients[1]
        typer.echo(f"refgw: demo clients ({', '.join(c for c, _ in demo_clients)}) have "
                   f"their private keys in {settings.demo_keys_dir}/", err=True)
        typer.echo("  get a token and make a first call:", err=True)
        typer.echo(f"    TOKEN=$(.venv/bin/refgw token --url http://{h}:{p} --client-id {cid} "
                   f"--key {key} --scope 'system/Organization.rs system/Task.rs')", err=True)
        typer.echo(f"    curl -H \"Authorization: Bearer $TOKEN\" "
                   f"'http://{h}:{p}/Organization?_count=5'", err=True)
    options: dict[str, Any] = {"host": h, "port": p, "log_level": settings.log_level.lower(),
                               "access_log": False, "timeout_graceful_shutdown": 30}
    if n_workers == 1:
        uvicorn.run(create_app(settings, store=store, prepared=True), **options)
        return
    # Several processes: each worker builds its own app from the environment (a factory by
    # import path, as uvicorn's workers need), with its own pool, audit writer and caches;
    # every state they share is in the database. The workers get SIGTERM from uvicorn's
    # supervisor on Ctrl+C / SIGTERM and shut down gracefully, each flushing its audit trail.
    store.dispose()
    uvicorn.run("gateway.api.app:worker_app", factory=True, workers=n_workers, **options)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why refgw could not listen on host:port (None: it can), naming what holds a taken
    port where that is cheap to find out. A check, not a reservation: the socket is closed."""
    import errno
    import socket

    if not 0 < port < 65536:
        return f"port {port} is not a TCP port: give one from 1 to 65535 (--port / REFGW_PORT)"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OverflowError) as exc:
        return f"cannot listen on {host}:{port}: {exc} (check --host / REFGW_HOST)"
    other = ("pick another port: `refgw serve --port 8081`, or REFGW_PORT=8081 (also for "
             "`make run`)")
    # every address the name stands for, as uvicorn (asyncio's create_server) binds them all,
    # skipping, as it does, those of a family this machine has not enabled
    bound = False
    for family, kind, proto, _canon, address in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            bound = True
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                holder = _port_holder(port)
                return (f"port {port} on {host} is already in use"
                        f"{f' by {holder}' if holder else ''}. Stop that program, or {other}")
            if exc.errno == errno.EACCES:
                return (f"not allowed to listen on port {port} (ports below 1024 need extra "
                        f"privileges): {other}")
            if exc.errno != errno.EADDRNOTAVAIL:
                return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        finally:
            sock.close()
    if not bound:
        return (f"cannot listen on {host}: it is not an address of this machine (check "
                "--host / REFGW_HOST; 127.0.0.1 is this machine only)")
    return None


def _port_holder(port: int) -> str | None:
    """'pid N (command line)' of the process listening on ``port``, from /proc (Linux; best
    effort: None where it cannot be found, e.g. another user's process or another OS)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode
            if len(fields) > 9 and fields[3] == "0A" and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    raw = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
                    command = raw.decode("utf-8", "replace")[:200]
                    return f"pid {proc.name}" + (f" ({command})" if command else "")
        except OSError:  # gone, or not ours to look at
            continue
    return None


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


@db_app.command("rebuild-grants")
def db_rebuild_grants() -> None:
    """Recompute every access grant (who may see what) from the stored resources, e.g. after
    a change of the access rules or a bulk load behind refgw's back."""
    from gateway.access.grants import rebuild_all

    store = _store()
    with store.engine.begin() as conn:
        rebuild_all(conn, store.dialect)
    typer.echo("access grants rebuilt")


def _store() -> Any:
    from gateway.store.db import current_revision, head_revision
    from gateway.store.repository import Store

    settings = Settings()
    try:
        store = Store(settings.database_url)
        if current_revision(store.engine) != head_revision():
            _fail("the database schema is not current: run `refgw db upgrade` first")
    except typer.Exit:
        raise
    except Exception as exc:
        _fail(f"cannot open the database {_safe_url(settings.database_url)}: {exc}")
    return store


@clients_app.command("add")
def clients_add(
    client_id: Annotated[str, typer.Argument(help="The client's id (iss/sub of its "
                                                  "assertions).")],
    scope: Annotated[str, typer.Option(help='Maximum scopes, e.g. "system/Task.rs '
                                            'system/ServiceRequest.cr".')],
    org: Annotated[str | None, typer.Option(help="Organization/ID the client acts for.")] = None,
    jwks: Annotated[Path | None, typer.Option(help="File with the client's public JWKS.")] = None,
    jwks_uri: Annotated[str | None, typer.Option(help="URL of the client's JWKS.")] = None,
    platform: Annotated[bool, typer.Option(help="Bind the client to the platform itself "
                                                "(operators: sees everything its scopes "
                                                "allow).")] = False,
    validation: Annotated[list[str] | None, typer.Option(
        help="Validation policy of this client's writes, TYPE=MODE (repeatable; MODE "
             "reject, warn or off; a bare MODE means every type). Default: refgw's "
             "(reject referral Tasks and ServiceRequests, warn Condition/Observation/Goal).")
    ] = None,
    fhir_base: Annotated[str | None, typer.Option(
        help="Base URL of the client's own FHIR server: absolute references into it that "
             "name the client's own Organization are stored as local references.")] = None,
    coordination: Annotated[str | None, typer.Option(
        help="With --platform: 'external' when this client is itself the Coordination "
             "Platform app (refgw then leaves routing the platform's referrals to it).")
    ] = None,
) -> None:
    """Register a client (give exactly one of --jwks and --jwks-uri)."""
    from gateway.auth.clients import ClientError, ClientRegistry

    if (jwks is None) == (jwks_uri is None):
        typer.echo("refgw: error: give exactly one of --jwks FILE and --jwks-uri URL", err=True)
        raise typer.Exit(2)
    if platform and org is None:
        org = Settings().platform_organization
    store = _store()
    try:
        data = json.loads(jwks.read_text()) if jwks else None
        ClientRegistry(store.engine).add(client_id, organization=org, scope=scope, jwks=data,
                                         jwks_uri=jwks_uri, platform=platform,
                                         validation=validation, fhir_base=fhir_base,
                                         coordination=coordination)
    except (ClientError, OSError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"client {client_id} registered for {org}")


@clients_app.command("list")
def clients_list() -> None:
    """List registered clients."""
    from gateway.auth.clients import ClientRegistry

    for c in ClientRegistry(_store().engine).all():
        keys = "jwks_uri=" + c.jwks_uri if c.jwks_uri else f"{len(c.jwks['keys'])} inline key(s)"
        typer.echo(f"{c.client_id}\t{'active' if c.active else 'DISABLED'}\t"
                   f"{c.organization or '-'}{' (platform)' if c.platform else ''}\t{keys}\t"
                   f"{c.scope}\tvalidation={format_policy(c.validation)}"
                   + (f"\tfhir-base={c.fhir_base}" if c.fhir_base else "")
                   + (f"\tcoordination={c.coordination}" if c.coordination else ""))


@clients_app.command("validation")
def clients_validation(
    client_id: Annotated[str, typer.Argument(help="The client.")],
    policy: Annotated[list[str] | None, typer.Argument(
        help="TYPE=MODE ... (MODE reject, warn or off; a bare MODE means every type). "
             "None: show the current policy.")] = None,
    reset: Annotated[bool, typer.Option(help="Back to refgw's defaults.")] = False,
) -> None:
    """Show or set how strictly a client's writes are validated against refgw's profiles."""
    from gateway.auth.clients import ClientError, ClientRegistry

    registry = ClientRegistry(_store().engine)
    try:
        if reset or policy:
            current = registry.set_validation(client_id, None if reset else policy)
        else:
            client = registry.get(client_id)
            if client is None:
                raise ClientError(f"no client {client_id!r}")
            current = client.validation
    except ClientError as exc:
        _fail(str(exc))
        return
    typer.echo(f"client {client_id} validation: {format_policy(current)} "
               "(unlisted types: the deployment's policy, then refgw's defaults)")


@clients_app.command("disable")
def clients_disable(client_id: Annotated[str, typer.Argument(help="The client to disable.")]
                    ) -> None:
    """Disable a client: it gets no new tokens and its current tokens stop working."""
    from gateway.auth.clients import ClientError, ClientRegistry

    try:
        ClientRegistry(_store().engine).set_active(client_id, False)
    except ClientError as exc:
        _fail(str(exc))
    typer.echo(f"client {client_id} disabled")


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Start signing tokens with a new key; the old one verifies until its tokens expire."""
    from gateway.auth.keys import SigningKeys

    kid = SigningKeys(_store().engine).rotate()
    typer.echo(f"new signing key {kid}")


def _instant(value: str | None, option: str) -> int | None:
    """The first microsecond of a FHIR date, dateTime or instant given to ``option``."""
    from gateway.fhir.datetimes import parse_range

    if value is None:
        return None
    rng = parse_range(value)
    if rng is None:
        typer.echo(f"refgw: error: {option} {value!r} is not a date or time: write e.g. "
                   "2025, 2025-01, 2025-01-31 or 2025-01-31T12:00:00Z", err=True)
        raise typer.Exit(2)
    return rng[0]


def _audit_cli_event(store: Any, interaction: str, outcome: str = "success") -> None:
    """What the command did to the audit trail, in the audit trail (client ``refgw-cli``)."""
    from gateway.auth.audit import AuditWriter
    from gateway.store.policy import AuditRecord, Caller

    writer = AuditWriter(store, upkeep=False)
    try:
        writer.record(AuditRecord(interaction, "AuditEvent", None, outcome,
                                  Caller(client_id="refgw-cli")))
    finally:
        writer.close()


@audit_app.command("export")
def audit_export(
    since: Annotated[str | None, typer.Option(
        help="From this date or time on (inclusive), e.g. 2025-01 or 2025-01-31T12:00:00Z. "
             "Default: the oldest event.")] = None,
    until: Annotated[str | None, typer.Option(
        help="Up to this date or time (exclusive: --until 2025-02 stops at the end of "
             "January). Default: no end.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write to this file (default: stdout).")
                   ] = None,
) -> None:
    """Write AuditEvents as NDJSON: one AuditEvent per line, oldest first.

    To move old events out before `refgw audit purge` removes them."""
    from gateway.store.audit import export_lines

    since_us, until_us = _instant(since, "--since"), _instant(until, "--until")
    store = _store()
    n = 0
    try:
        with (open(out, "wb") if out else nullcontext(sys.stdout.buffer)) as sink:
            for line in export_lines(store.engine, since_us, until_us):
                sink.write(line)
                n += 1
            sink.flush()
    except OSError as exc:
        _fail(f"cannot write the export: {exc}")
    _audit_cli_event(store, "operation")
    typer.echo(f"refgw: exported {n} audit events" + (f" to {out}" if out else ""), err=True)


@audit_app.command("purge")
def audit_purge() -> None:
    """Remove AuditEvents older than REFGW_AUDIT_RETENTION_DAYS.

    Default 2190 days (six years); 0 keeps them forever. `refgw serve` does this daily."""
    from gateway.fhir.datetimes import format_instant
    from gateway.store.audit import purge

    days = Settings().audit_retention_days
    store = _store()
    if days == 0:
        typer.echo("refgw: REFGW_AUDIT_RETENTION_DAYS=0: the audit trail is kept forever; "
                   "nothing purged")
        return
    try:
        res = purge(store.engine, days, writer_lock=store._sqlite_writers)
    except Exception as exc:
        _fail(f"the purge failed: {exc}")
        return
    if res.skipped:
        typer.echo("refgw: another process is purging the audit trail right now; nothing done")
        return
    _audit_cli_event(store, "delete")
    dropped = f"{len(res.partitions_dropped)} partitions dropped, " \
        if store.dialect == "postgresql" else ""
    typer.echo(f"refgw: audit events recorded before {format_instant(res.cutoff or 0)} "
               f"({days} days ago) removed: {dropped}{res.rows_deleted} events deleted")


@app.command()
def token(
    client_id: Annotated[str, typer.Option(help="Your client id.")],
    key: Annotated[Path, typer.Option(help="Your private key (PEM, RSA or EC P-384).")],
    scope: Annotated[str, typer.Option(help="Scopes to ask for.")] = "system/*.rs",
    url: Annotated[str, typer.Option(help="refgw's base URL.")] = "http://127.0.0.1:8080",
    kid: Annotated[str | None, typer.Option(help="Key id (default: the JWK thumbprint).")
                   ] = None,
) -> None:
    """Get an access token (the real SMART Backend Services exchange) and print it."""
    import httpx

    from gateway.auth.assertion import fetch_token, load_private_key

    try:
        pk = load_private_key(key.read_bytes(), kid)
        disco = httpx.get(f"{url.rstrip('/')}/.well-known/smart-configuration", timeout=10)
        disco.raise_for_status()
        body = fetch_token(disco.json()["token_endpoint"], client_id, pk, scope)
    except Exception as exc:
        _fail(str(exc))
        return
    for line in _scopes_not_granted(scope, str(body.get("scope", ""))):
        typer.echo(line, err=True)  # stdout holds the token only: TOKEN=$(refgw token ...)
    typer.echo(body["access_token"])


def _scopes_not_granted(requested: str, granted: str) -> list[str]:
    """Lines telling which requested scopes the token lacks or has only in part (the
    client's registration allows less); none when everything asked for was granted."""
    from gateway.auth.scopes import ScopeError, intersect, parse_scope, parse_scopes

    try:
        have = parse_scopes(granted, strict=False)
    except ScopeError:  # pragma: no cover - strict=False does not raise
        return []
    lines = []
    for text in requested.split():
        try:
            asked = parse_scope(text)
        except ScopeError:
            continue  # not a SMART resource scope (the server said nothing about it)
        parts = [str(g) for g in intersect([asked], have)]
        if parts == [str(asked)]:
            continue
        lines.append(f"  {text}: " + (f"granted only {' '.join(parts)}" if parts
                                     else "not granted"))
    if lines:
        lines.insert(0, "refgw: note: the token has fewer scopes than asked for (the "
                        "client's registration allows no more; the operator sees it with "
                        "`refgw clients list`):")
    return lines


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
