"""The audit trail in a table of its own: ``audit_events`` (``gateway.store.audit``).

One row per AuditEvent, append-only: the columns its search parameters test and the event as
JSON; no versions, no history or index rows. On PostgreSQL the table is partitioned by range
of ``recorded`` (integer microseconds UTC): one partition per UTC month, named
``audit_events_pYYYYMM``, made here for the current month, the three ahead (refgw makes the
next ones itself) and each month an event moved here was recorded in, and
``audit_events_default`` as the safety net. On SQLite it is a plain table.

The AuditEvents stored so far as resources move here (their ids kept; ``recorded`` as their
``recorded`` element says), and their ``resources``, ``resource_history``, ``sp_*`` and
``access_grant`` rows go, a few thousand at a time. The downgrade moves them back (version 1,
with history and index rows), so no event is lost either way.

The table is written here as SQL of its own (not from the application's schema), so that this
migration keeps creating what it created whatever the code becomes.

Revision ID: 0010
Revises: 0009
"""

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BATCH = 2000
SEARCH_COLUMNS = ("type_system", "type_code", "subtype_system", "subtype_code", "action",
                  "outcome", "agent", "client", "entity_type", "entity_id", "source")
INDEX_TABLES = ("sp_token", "sp_reference", "sp_string", "sp_date", "sp_uri")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(microseconds=1)


def _month(us: int, months: int = 0) -> int:
    """The first microsecond of the UTC month of ``us``, ``months`` months later."""
    d = EPOCH + timedelta(microseconds=us)
    m = d.year * 12 + d.month - 1 + months
    return _us(datetime(m // 12, m % 12 + 1, 1, tzinfo=UTC))


def _columns(body: dict) -> tuple:
    """The searched columns of an AuditEvent (as ``gateway.store.audit.columns_of`` at the
    time of this migration)."""
    def obj(v):
        return v if isinstance(v, dict) else {}
    etype = obj(body.get("type"))
    subs = body.get("subtype") if isinstance(body.get("subtype"), list) else []
    sub = obj(subs[0]) if subs else {}
    agent = client = None
    for a in body.get("agent") or []:
        who = obj(obj(a).get("who"))
        if agent is None and isinstance(who.get("reference"), str):
            agent = who["reference"]
        ident = obj(who.get("identifier"))
        if client is None and ident.get("system") == "urn:refgw:client":
            client = ident.get("value")
    entity_type = entity_id = None
    ents = body.get("entity") if isinstance(body.get("entity"), list) else []
    what = obj(obj(ents[0]).get("what")) if ents else {}
    ref = what.get("reference")
    if isinstance(ref, str) and "/" in ref:
        head, _, entity_id = ref.rpartition("/")
        entity_type = head.rsplit("/", 1)[-1] or None
        entity_id = entity_id or None
    elif isinstance(what.get("display"), str):
        entity_type = what["display"]
    observer = obj(obj(body.get("source")).get("observer"))
    return (etype.get("system"), etype.get("code"), sub.get("system"), sub.get("code"),
            body.get("action"), body.get("outcome"), agent, client, entity_type, entity_id,
            observer.get("reference"))


def _recorded(body: dict, last_updated: int) -> int:
    value = body.get("recorded")
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if dt.tzinfo is not None:
                return _us(dt)
        except ValueError:
            pass
    return last_updated


def _create_pg() -> None:
    op.execute(
        "CREATE TABLE audit_events ("
        " id uuid NOT NULL, recorded bigint NOT NULL,"
        " type_system varchar, type_code varchar, subtype_system varchar,"
        " subtype_code varchar, action varchar(1), outcome varchar(2), agent varchar,"
        " client varchar, entity_type varchar, entity_id varchar, source varchar,"
        " body json NOT NULL,"
        " CONSTRAINT pk_audit_events PRIMARY KEY (recorded, id)"
        ") PARTITION BY RANGE (recorded)")
    op.execute("CREATE INDEX ix_audit_events_id ON audit_events (id)")
    op.execute("CREATE INDEX ix_audit_events_entity ON audit_events (entity_id, entity_type)")
    op.execute("CREATE INDEX ix_audit_events_agent ON audit_events (agent, recorded)")
    op.execute("CREATE TABLE audit_events_default PARTITION OF audit_events DEFAULT")
    now = _us(datetime.now(UTC))
    _partitions(_range_months(_month(now), _month(now, 4)))


def _range_months(low: int, end: int) -> list[int]:
    out = []
    while low < end:
        out.append(low)
        low = _month(low, 1)
    return out


_made: set[int] = set()


def _partitions(lows) -> None:
    """The monthly partitions starting at ``lows`` (microseconds) not made yet."""
    for low in sorted(set(lows) - _made):
        d = EPOCH + timedelta(microseconds=low)
        op.execute(f"CREATE TABLE IF NOT EXISTS audit_events_p{d.year:04d}{d.month:02d} "
                   f"PARTITION OF audit_events FOR VALUES FROM ({low}) TO ({_month(low, 1)})")
        _made.add(low)


def _create_sqlite() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("recorded", sa.BigInteger, nullable=False),
        *[sa.Column(c, sa.String(2) if c == "outcome" else sa.String(1) if c == "action"
                    else sa.String, nullable=True) for c in SEARCH_COLUMNS],
        sa.Column("body", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("recorded", "id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_id", "audit_events", ["id"])
    op.create_index("ix_audit_events_entity", "audit_events", ["entity_id", "entity_type"])
    op.create_index("ix_audit_events_agent", "audit_events", ["agent", "recorded"])


def _audit_table(pg: bool) -> sa.TableClause:
    return sa.table(
        "audit_events",
        sa.column("id", postgresql.UUID(as_uuid=False) if pg else sa.String),
        sa.column("recorded", sa.BigInteger),
        *[sa.column(c, sa.String) for c in SEARCH_COLUMNS],
        sa.column("body", sa.JSON))


def _delete_rows(bind, rids: list[int], grants: bool) -> None:
    ids = sa.bindparam("rids", expanding=True)
    for table in (*INDEX_TABLES, *(("access_grant",) if grants else ()), "resource_history",
                  "resources"):
        bind.execute(sa.text(f"DELETE FROM {table} WHERE rid IN :rids").bindparams(ids),
                     {"rids": rids})


def upgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    if pg:
        _made.clear()
        _create_pg()
    else:
        _create_sqlite()
    grants = sa.inspect(bind).has_table("access_grant")
    table = _audit_table(pg)
    last = 0
    while True:
        rows = bind.execute(sa.text(
            "SELECT rid, fhir_id, last_updated, body FROM resources "
            "WHERE res_type = 'AuditEvent' AND rid > :last ORDER BY rid LIMIT :n"),
            {"last": last, "n": BATCH}).all()
        if not rows:
            break
        values = []
        for _rid, fhir_id, last_updated, body in rows:
            body = orjson.loads(body) if isinstance(body, (str, bytes)) else dict(body or {})
            try:
                event_id = str(uuid.UUID(fhir_id))
            except ValueError:  # refgw gave every event a UUID; anything else gets one now
                event_id = str(uuid.uuid4())
                body["id"] = event_id
            values.append({"id": event_id, "recorded": _recorded(body, last_updated),
                           **dict(zip(SEARCH_COLUMNS, _columns(body), strict=True)),
                           "body": body})
        if pg:  # the months of these events (the current ones exist already)
            _partitions(_month(v["recorded"]) for v in values)
        bind.execute(table.insert(), values)
        _delete_rows(bind, [r[0] for r in rows], grants)
        last = rows[-1][0]


def downgrade() -> None:
    from gateway.fhir.extract import extract  # the index rows the resources table needs

    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    resources = sa.table("resources", sa.column("res_type"), sa.column("fhir_id"),
                         sa.column("version"), sa.column("last_updated"), sa.column("deleted"),
                         sa.column("body", sa.JSON), sa.column("author_org"))
    kinds = {"token": ("param", "system", "code"),
             "reference": ("param", "target_type", "target_id", "target_url"),
             "string": ("param", "value", "exact"), "date": ("param", "low", "high"),
             "uri": ("param", "value")}
    last: tuple[int, str] | None = None
    while True:
        q = "SELECT id, recorded, body FROM audit_events"
        params: dict = {"n": BATCH}
        if last is not None:
            q += " WHERE recorded > :r OR (recorded = :r AND id > :i)"
            params.update(r=last[0], i=last[1])
        rows = bind.execute(sa.text(q + " ORDER BY recorded, id LIMIT :n"), params).all()
        if not rows:
            break
        for event_id, recorded, body in rows:
            body = orjson.loads(body) if isinstance(body, (str, bytes)) else dict(body)
            rid = bind.execute(resources.insert().values(
                res_type="AuditEvent", fhir_id=str(event_id), version=1,
                last_updated=recorded, deleted=False, body=body, author_org=None)
                .returning(sa.column("rid"))).scalar_one()
            bind.execute(sa.text(
                "INSERT INTO resource_history (rid, version, res_type, fhir_id, last_updated, "
                "deleted, method, body) SELECT rid, 1, res_type, fhir_id, last_updated, "
                "deleted, 'POST', body FROM resources WHERE rid = :rid"), {"rid": rid})
            index = extract(body)
            for kind, cols in kinds.items():
                for v in getattr(index, kind):
                    bind.execute(sa.text(
                        f"INSERT INTO sp_{kind} (rid, res_type, {', '.join(cols)}) VALUES "
                        f"(:rid, 'AuditEvent', {', '.join(':' + c for c in cols)})"),
                        {"rid": rid, **dict(zip(cols, v, strict=True))})
        last = (rows[-1][1], str(rows[-1][0]))
    op.execute("DROP TABLE audit_events" + (" CASCADE" if pg else ""))
