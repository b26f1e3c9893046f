"""The repository: versioned FHIR resources with search indexes, on SQLite or PostgreSQL.

``Store`` owns the engine; ``Store.session(ctx, write=...)`` opens one database transaction and
yields a :class:`Session`. Every method of ``Session`` applies the context's access policy and
reports to its audit sink, so the HTTP and CLI shells never check permissions themselves.

Concurrency:

- updates lock the current row (``FOR UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` serializes
  writers on SQLite) so If-Match is checked against the version actually being replaced;
- conditional create takes a transaction-scoped advisory lock on the normalized criteria, so
  concurrent creates with the same ``If-None-Exist`` store exactly one resource.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import (
    Connection,
    and_,
    any_,
    bindparam,
    false,
    func,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY

from gateway.access import grants
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    Gone,
    Hidden,
    Issue,
    NotFound,
    PreconditionFailed,
)
from gateway.fhir.datetimes import format_instant
from gateway.fhir.extract import extract
from gateway.fhir.searchparams import REFERENCE, RESOURCE_TYPES
from gateway.store import audit as audit_store
from gateway.store import audit_search
from gateway.store.audit_search import AuditQuery
from gateway.store.db import Dialect, dialect_of, make_engine, side_connector
from gateway.store.inflight import InflightWrites
from gateway.store.policy import AuditRecord, Context
from gateway.store.schema import INDEX_TABLES, resource_history, resources, write_inflight
from gateway.store.search import (
    IncludeSpec,
    QueryBuilder,
    SearchQuery,
    apply_cursor,
    encode_cursor,
    sort_columns,
)
from gateway.store.writes import NewResource, insert_new, write_version


@dataclass(slots=True)
class Stored:
    """One stored version of a resource."""

    rid: int
    res_type: str
    id: str
    version: int
    last_updated: int
    deleted: bool
    body: dict[str, Any] | None
    author_org: str | None = None  # the organization that created it

    @classmethod
    def of(cls, r: Any) -> Stored:
        """From a ``resources`` or ``resource_history`` row."""
        return cls(r.rid, r.res_type, r.fhir_id, r.version, r.last_updated, r.deleted, r.body,
                   getattr(r, "author_org", None))


def _audit_stored(row: audit_store.AuditRow) -> Stored:
    """An audit event as a stored resource (version 1, never changed; no rid: not a row of
    ``resources``)."""
    return Stored(0, "AuditEvent", row.id, 1, row.recorded, False, row.body)


@dataclass(slots=True)
class _AuditTarget:
    res_id: str | None


@dataclass(slots=True)
class SearchPage:
    matches: list[Stored]
    included: list[Stored]
    total: int | None
    next_cursor: str | None
    next_offset: int | None
    warnings: list[Issue] = field(default_factory=list)  # e.g. a _revinclude cut off


class _Clock:
    """Strictly increasing microsecond timestamps within this process."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> int:
        with self._lock:
            t = time.time_ns() // 1000
            self._last = max(t, self._last + 1)
            return self._last


#: A write transaction's statements are point look-ups (re-sends, ``ifNoneExist``, locks) and
#: refgw's own constant inserts: PostgreSQL may keep their generic plans (psycopg prepares a
#: statement on its 5th run). Planning each run for its values (``force_custom_plan``, which
#: ``gateway.store.db`` sets for the searches, whose best plan depends on the values) cost more
#: than running them: 1.5 ms of planning for 0.1 ms of execution for a look-up by identifier.
_WRITE_PLANS = "SET LOCAL plan_cache_mode = auto"


class WriterQueue:
    """This process's SQLite writers, one at a time (reentrant, as a ``threading.RLock``).

    A batch of audit events (``first()``, ``gateway.auth.audit``) goes before the write
    transactions waiting, after the one running: it holds the database ~1 ms, and every read
    answered meanwhile waits for it; but it never goes twice in a row while a write
    transaction waits, so a stream of reads cannot starve the writes."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._waiting = {True: 0, False: 0}  # waiters by kind (True: an audit batch)
        self._last_first = False  # the last holder was an audit batch

    def _free_for(self, first: bool) -> bool:
        if self._owner is not None:
            return False
        if first:
            return not (self._last_first and self._waiting[False])
        return not self._waiting[True] or self._last_first

    def acquire(self, first: bool = False) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            self._waiting[first] += 1
            try:
                while not self._free_for(first):
                    self._cond.wait()
            finally:
                self._waiting[first] -= 1
            self._owner, self._depth, self._last_first = me, 1, first

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> WriterQueue:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextmanager
    def first(self) -> Iterator[None]:
        self.acquire(first=True)
        try:
            yield
        finally:
            self.release()


#: most resources a ``_revinclude`` adds per target type and page (see ``Session._reverse``)
REVINCLUDE_CAP = 1000


def _one_of(dialect: Dialect, col: Any, values: list[Any]) -> Any:
    """``col IN values``; on PostgreSQL ``col = ANY(array)``: one statement text whatever the
    number of values, so psycopg's prepared statement is reused (includes, bench_polling.py)."""
    if dialect == "postgresql":
        return col == any_(bindparam(None, values, type_=ARRAY(col.type)))
    return col.in_(values)


def horizon_of(now: int, oldest: int | None) -> int:
    """The visible horizon (see ``Store.visible_horizon``) from a :meth:`Store.horizon_probe`."""
    return now if oldest is None else min(now, oldest)


def _lock_key(text_: str) -> int:
    return int.from_bytes(hashlib.blake2b(text_.encode(), digest_size=8).digest(), "big",
                          signed=True)


_VOLATILE_META = ("versionId", "lastUpdated")


def _same_content(stored: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether ``new`` (a resource about to be written, without id) says exactly what the
    stored version says, ignoring id and the meta that refgw stamps on every version."""
    if stored is None:
        return False
    a = {k: v for k, v in stored.items() if k not in ("id", "meta")}
    b = {k: v for k, v in new.items() if k not in ("id", "meta")}
    if a != b:
        return False
    ma = {k: v for k, v in (stored.get("meta") or {}).items() if k not in _VOLATILE_META}
    mb = {k: v for k, v in (new.get("meta") or {}).items() if k not in _VOLATILE_META}
    return ma == mb


def normalize_criteria(criteria: str) -> list[tuple[str, str]]:
    """Conditional criteria (``identifier=a|b&status=x``) as sorted parameter pairs."""
    pairs = parse_qsl(criteria.lstrip("?"), keep_blank_values=True)
    if not pairs:
        raise BadRequest(f"Conditional criteria {criteria!r} are empty")
    return sorted(pairs)


class WriteHook(Protocol):
    """Domain rules that run inside the writing transaction (see gateway.workflow).

    Order for a write: ``prepare`` (before the access policy looks at it), then for a create
    ``existing`` (the write is a re-send of something stored: answer with that), the access
    policy's ``check_write``, ``before_write``, the write itself, ``after_write``."""

    def prepare(self, session: Session, interaction: str, res_type: str,
                old: Stored | None, new: dict[str, Any]) -> list[Issue]:
        """Complete ``new`` in place before the access policy checks it (e.g. fill in what
        the caller's token already says); idempotent; return warnings."""

    def existing(self, session: Session, res_type: str,
                 new: dict[str, Any]) -> tuple[Stored, Issue] | None:
        """A stored resource that ``new`` (a create, prepared) duplicates, and a warning
        saying so; None when ``new`` is new."""

    def before_write(self, session: Session, interaction: str, res_type: str,
                     old: Stored | None, new: dict[str, Any]) -> list[Issue]:
        """Check (raise a GatewayError) or complete ``new`` in place; return warnings."""

    def after_write(self, session: Session, interaction: str, res_type: str,
                    old: Stored | None, stored: Stored) -> None:
        """Side effects in the same transaction."""


class Store:
    """The resource store for one database."""

    def __init__(self, url: str, pool_size: int = 10, default_page_size: int = 200,
                 max_page_size: int = 1000) -> None:
        self.engine = make_engine(url, pool_size=pool_size)
        self.dialect: Dialect = dialect_of(self.engine)
        self.clock = _Clock()
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        # SQLite writers of this process queue here before BEGIN IMMEDIATE: SQLite's busy
        # handler polls with sleeps of up to 100 ms and is unfair, so under concurrent writes
        # some requests waited seconds (bench/: p99 2.4 s at 8 clients; 0.17 s with the lock).
        # (an audit batch goes first: WriterQueue)
        self._sqlite_writers = WriterQueue()
        #: write transactions in flight (PostgreSQL; ``gateway.store.inflight``)
        self._inflight_writes = InflightWrites(side_connector(url), self.clock.now,
                                               keep=pool_size) \
            if self.dialect == "postgresql" else None
        #: write hooks run inside every write's transaction (the referral workflow)
        self.hooks: list[WriteHook] = []

    def dispose(self) -> None:
        if self._inflight_writes is not None:
            self._inflight_writes.close()
        self.engine.dispose()

    def ping(self) -> bool:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True

    @contextmanager
    def session(self, ctx: Context | None = None, *, write: bool = False) -> Iterator[Session]:
        """One database transaction. Commits on normal exit, rolls back on any exception."""
        queue = self._sqlite_writers if write and self.dialect == "sqlite" else nullcontext()
        inflight = self._inflight() if write and self._inflight_writes is not None \
            else nullcontext()
        session: Session | None = None
        committed = False
        try:
            with queue, inflight, self.engine.connect() as conn:
                if write and self.dialect == "sqlite":
                    conn = conn.execution_options(refgw_write=True)
                session = Session(self, conn, ctx or Context())
                with conn.begin():
                    if write and self.dialect == "postgresql":
                        conn.exec_driver_sql(_WRITE_PLANS)
                    yield session
                    session.flush_access()  # the grants commit with what they describe
                    if write:  # so do the audit events (gateway.auth.audit)
                        session.audit_in_transaction()
                committed = True
        finally:
            # audit what the transaction did once its fate is known, and (SQLite) after the
            # writers' lock is released: the audit writer's group commit takes it
            if session is not None:
                session.report_audit(committed)


    def _inflight(self) -> AbstractContextManager[int]:
        """Register a write transaction (committed at once) before it stamps anything, and
        remove it when it has ended; see migration 0005 and ``gateway.store.inflight`` (own
        autocommit connections, not two of the pool's per write)."""
        assert self._inflight_writes is not None
        return self._inflight_writes.registered()

    def visible_horizon(self, conn: Connection) -> int | None:
        """Rows stamped at or after this instant may still be joined by earlier-stamped rows
        of transactions in flight: ``_lastUpdated`` polling must not return them yet."""
        probe = self.horizon_probe()
        if probe is None:
            return None
        now, oldest = probe
        return horizon_of(now, conn.execute(select(oldest)).scalar())

    def horizon_probe(self) -> tuple[int, Any] | None:
        """``(now, oldest)``: the time taken before looking (a writer registering later stamps
        later) and a scalar subquery, the start of the oldest write in flight, to select along
        with a query (one statement, one snapshot, no extra round trip); the horizon is then
        :func:`horizon_of`. None on SQLite, which has one writer at a time."""
        if self.dialect != "postgresql":
            return None
        now = self.clock.now()
        return now, select(func.min(write_inflight.c.started)).where(
            write_inflight.c.expires > now).scalar_subquery()


class Session:
    """The operations of one transaction, seen through the caller's access policy."""

    def __init__(self, store: Store, conn: Connection, ctx: Context, *,
                 parent: Session | None = None) -> None:
        self.store = store
        self.conn = conn
        self.ctx = ctx
        self._now: int | None = parent.now if parent is not None else None
        # a child session (the workflow acting as the platform in the same transaction)
        # shares its parent's audit records and warnings
        self._audit_records: list[AuditRecord] = (
            parent._audit_records if parent is not None else [])
        self.warnings: list[Issue] = parent.warnings if parent is not None else []
        self._audit_written = False  # the records went into the transaction (committed)
        #: what this transaction's writes left for the relayed grants to recompute
        self._marks: grants.Marks = parent._marks if parent is not None else {}
        #: what this transaction created, and for which organization
        self._made: dict[tuple[str, str], str | None] = (
            parent._made if parent is not None else {})

    def child(self, ctx: Context) -> Session:
        """Another view of this same transaction (e.g. the platform acting for a workflow)."""
        return Session(self.store, self.conn, ctx, parent=self)

    def drain_warnings(self) -> list[Issue]:
        out, self.warnings[:] = list(self.warnings), []
        return out

    # -- helpers ---------------------------------------------------------------------------
    @property
    def now(self) -> int:
        """The transaction's timestamp (all writes of one transaction share it)."""
        if self._now is None:
            self._now = self.store.clock.now()
        return self._now

    def _audit(self, interaction: str, res_type: str | None, res_id: str | None,
               outcome: str = "success", issues: list[Issue] | None = None) -> None:
        self._audit_records.append(AuditRecord(
            interaction, res_type, res_id, outcome, self.ctx.caller,
            tuple(f"{i.severity} {i.code} {i.refgw_code or '-'} {','.join(i.expression)}"
                  for i in issues or ())))

    def audit_in_transaction(self) -> None:
        """Store this write transaction's audit records in it, just before its commit (the
        store calls it): they commit with what they record, at the price of one insert."""
        if self._audit_records and self.ctx.audit.record_in(self.conn, self._audit_records):
            self._audit_written = True

    def report_audit(self, committed: bool) -> None:
        """Hand this transaction's audit records to the sink, unless they committed with it;
        returns once they are stored. When it rolled back, nothing it did happened: a
        "success" (e.g. the first creates of a failed transaction) is reported as failed."""
        records, self._audit_records = self._audit_records, []
        if committed and self._audit_written:
            return
        for rec in records:
            if not committed and rec.outcome == "success":
                rec.outcome = "failed"
        self.ctx.audit.record_many(records)

    @contextmanager
    def _audited(self, interaction: str, res_type: str | None,
                 res_id: str | None = None) -> Iterator[_AuditTarget]:
        """Check the caller's scopes for ``interaction``, then audit its outcome."""
        target = _AuditTarget(res_id)
        seen = len(self.warnings)
        try:
            self.ctx.policy.authorize(interaction, res_type)
            yield target
        except (Forbidden, Hidden):
            self._audit(interaction, res_type, target.res_id, "denied")
            raise
        except GatewayError as err:
            self._audit(interaction, res_type, target.res_id, "failed", err.issues)
            raise
        # the warnings this interaction produced (validation under a "warn" policy)
        self._audit(interaction, res_type, target.res_id, issues=self.warnings[seen:])

    def _visible(self, res_type: str, *, relay: bool = True):
        """The caller's visibility condition on ``resources`` for ``res_type``. Grants this
        transaction's writes relay are brought up to date first (``relay=False``: not, for a
        check that retries on a miss, see :meth:`can_see`)."""
        vis = self.ctx.policy.visible(res_type, resources)
        if vis is not None and relay and self._marks and res_type != "Task":
            self.flush_access()  # Tasks' grants are all direct: never waiting for a relay
        return vis

    def flush_access(self) -> None:
        """Recompute the relayed grants this transaction's writes have marked
        (``gateway.access.grants``); the store calls it before every commit."""
        if self._marks:
            marks = dict(self._marks)
            self._marks.clear()
            grants.relay(self.conn, self.store.dialect, marks)

    def _row(self, res_type: str, res_id: str, *, lock: bool = False,
             policy: bool = True, relay: bool = True) -> Stored | None:
        stmt = select(resources).where(resources.c.res_type == res_type,
                                       resources.c.fhir_id == res_id)
        vis = self._visible(res_type, relay=relay) if policy else None
        if vis is not None:
            stmt = stmt.where(vis)
        if lock and self.store.dialect == "postgresql":
            stmt = stmt.with_for_update()
        r = self.conn.execute(stmt).first()
        return Stored.of(r) if r is not None else None

    def _not_found(self, res_type: str, res_id: str) -> NotFound:
        """404 for a resource the caller cannot see: ``Hidden`` when it exists (so that the
        audit records a denial), else ``NotFound``; both answer the same."""
        cls = NotFound
        if self._visible(res_type) is not None and \
                self._row(res_type, res_id, policy=False) is not None:
            cls = Hidden
        return cls(f"{res_type}/{res_id} is not known", f"{res_type}.id")

    def peek(self, res_type: str, res_id: str) -> Stored | None:
        """The current version whatever the caller may see (for policies; never returned
        to a caller)."""
        row = self._row(res_type, res_id, policy=False)
        return row if row is not None and not row.deleted else None

    def made_here(self, res_type: str, res_id: str) -> bool:
        """Whether the caller's organization created ``res_type/res_id`` in this very
        transaction (a Bundle's Patient, which its Task then points at)."""
        org = self.ctx.caller.organization
        return org is not None and self._made.get((res_type, res_id), None) == org

    def can_see(self, res_type: str, res_id: str) -> bool:
        """Whether the caller may see ``res_type/res_id`` (for policies). The grants this
        transaction's writes relay are brought up to date only on a miss: a hit is the
        caller's already."""
        if self._row(res_type, res_id, relay=False) is not None:
            return True
        if not self._marks:
            return False
        self.flush_access()
        return self._row(res_type, res_id) is not None

    def _stamp(self, resource: dict[str, Any], res_id: str, version: int) -> dict[str, Any]:
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = format_instant(self.now)
        out = {"resourceType": resource["resourceType"], "id": res_id, "meta": meta}
        out.update({k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")})
        return out

    def _copy(self, resource: dict[str, Any]) -> dict[str, Any]:
        """A private copy of a (JSON) resource for the hooks to complete in place; an orjson
        round trip is ~10x cheaper than ``copy.deepcopy``."""
        return orjson.loads(orjson.dumps(resource))

    # -- interactions ----------------------------------------------------------------------
    def read(self, res_type: str, res_id: str, *, for_write: str | None = None) -> Stored:
        """The current version. ``for_write`` names the write this read prepares (a patch):
        its scope is checked first, so a caller without it gets 403 (not 404 or the data)."""
        if for_write is not None:
            try:
                self.ctx.policy.authorize(for_write, res_type)
            except Forbidden:
                self._audit(for_write, res_type, res_id, "denied")
                raise
        with self._audited("read", res_type, res_id):
            row = self._row(res_type, res_id)
            if row is None:
                raise self._not_found(res_type, res_id)
            if row.deleted:
                raise Gone(f"{res_type}/{res_id} was deleted", f"{res_type}.id",
                           headers={"ETag": f'W/"{row.version}"'})
            return row

    def vread(self, res_type: str, res_id: str, version: int) -> Stored:
        with self._audited("vread", res_type, res_id):
            current = self._row(res_type, res_id)
            if current is None:
                raise self._not_found(res_type, res_id)
            r = self.conn.execute(select(resource_history).where(
                resource_history.c.rid == current.rid,
                resource_history.c.version == version)).first()
            if r is None:
                raise NotFound(f"{res_type}/{res_id} has no version {version}",
                               f"{res_type}.meta.versionId")
            if r.deleted:
                raise Gone(f"Version {version} of {res_type}/{res_id} is a deletion",
                           f"{res_type}.meta.versionId")
            return Stored.of(r)

    def create(self, resource: dict[str, Any], *, res_id: str | None = None,
               if_none_exist: str | None = None,
               resend_checked: bool = False) -> tuple[Stored, bool]:
        """Store a new resource. With ``if_none_exist``, return the match instead
        (created=False); likewise what the hooks say it re-sends, unless ``resend_checked``
        (a transaction's entry that :meth:`find_existing` looked at already, under the same
        locks)."""
        res_type = resource["resourceType"]
        with self._audited("create", res_type, res_id) as target:
            if if_none_exist:
                pairs = normalize_criteria(if_none_exist)
                self.lock(f"create:{res_type}?{pairs}")
                found = self.find(res_type, pairs)
                if len(found) > 1:
                    raise PreconditionFailed(
                        f"If-None-Exist {if_none_exist!r} matches {len(found)} {res_type} "
                        "resources; it must match at most one", "If-None-Exist")
                if found:
                    target.res_id = found[0].id
                    return found[0], False
            resource = self._prepared("create", resource, None)
            found = None if resend_checked else self._existing(res_type, resource)
            if found is not None:
                target.res_id = found.id
                return found, False
            stored = self._create(resource, res_id, prepared=True)
            target.res_id = stored.id
            return stored, True

    def _prepared(self, interaction: str, resource: dict[str, Any],
                  old: Stored | None) -> dict[str, Any]:
        """A private copy of ``resource`` completed by the hooks' ``prepare``."""
        resource = self._copy(resource)
        for hook in self.store.hooks:
            self.warnings.extend(hook.prepare(self, interaction, resource["resourceType"],
                                              old, resource))
        return resource

    def _existing(self, res_type: str, resource: dict[str, Any]) -> Stored | None:
        """What a prepared create duplicates (a re-sent referral), its warning recorded."""
        for hook in self.store.hooks:
            hit = hook.existing(self, res_type, resource)
            if hit is not None:
                self.warnings.append(hit[1])
                return hit[0]
        return None

    def find_existing(self, resource: dict[str, Any]) -> tuple[Stored, list[Issue]] | None:
        """For a transaction's create entries, before ids are settled: what ``resource`` would
        duplicate, with the warnings its create would give."""
        seen = len(self.warnings)
        prepared = self._prepared("create", resource, None)
        found = self._existing(resource["resourceType"], prepared)
        issues = self.warnings[seen:]
        del self.warnings[seen:]
        return (found, issues) if found is not None else None

    def _create(self, resource: dict[str, Any], res_id: str | None, *,
                prepared: bool = False) -> Stored:
        res_type = resource["resourceType"]
        if not prepared:
            resource = self._prepared("create", resource, None)
        self.ctx.policy.check_write(self, "create", res_type, None,
                                    {**resource, "id": res_id} if res_id else resource)
        for hook in self.store.hooks:
            self.warnings.extend(hook.before_write(self, "create", res_type, None, resource))
        res_id = res_id or str(uuid.uuid4())
        body = self._stamp(resource, res_id, 1)
        author = self.ctx.caller.organization
        index = extract(body, self.ctx.base_url)
        rid = insert_new(self.conn, self.store.dialect, [NewResource(
            res_type, res_id, self.now, body, author, index,
            grants.direct_grants(res_type, index, author))])[0]
        if rid is None:
            raise PreconditionFailed(f"{res_type}/{res_id} already exists", f"{res_type}.id")
        grants.relay_marks(self._marks, res_type, res_id, None, body, self.ctx.base_url)
        self._made[(res_type, res_id)] = author
        stored = Stored(rid, res_type, res_id, 1, self.now, False, body, author)
        for hook in self.store.hooks:
            hook.after_write(self, "create", res_type, None, stored)
        return stored

    # -- the audit trail (its own table, not resources: gateway.store.audit) ---------------
    def _audit_trail_visible(self) -> bool:
        """Whether the caller sees the audit trail: the access policy's visibility of
        AuditEvent, which is everything (None) for the platform and nothing for anyone else.
        A narrower condition (a scope with a query, ``system/AuditEvent.rs?outcome=4``) is SQL
        on ``resources`` that cannot filter ``audit_events``: it shows nothing (deny by
        default)."""
        return self.ctx.policy.visible("AuditEvent", resources) is None

    def _audit_event(self, event_id: str) -> audit_store.AuditRow:
        row = audit_store.get(self.conn, event_id)
        if row is None:
            raise NotFound(f"AuditEvent/{event_id} is not known", "AuditEvent.id")
        if not self._audit_trail_visible():
            raise Hidden(f"AuditEvent/{event_id} is not known", "AuditEvent.id")
        return row

    def read_audit(self, event_id: str, version: int | None = None) -> Stored:
        """An AuditEvent (``version``: a vread; an event never changes, its one version is
        1). Reading the audit trail is audited too."""
        with self._audited("read" if version is None else "vread", "AuditEvent", event_id):
            row = self._audit_event(event_id)
            if version is not None and version != 1:
                raise NotFound(f"AuditEvent/{event_id} has no version {version}: an "
                               "AuditEvent never changes, its only version is 1",
                               "AuditEvent.meta.versionId")
            return _audit_stored(row)

    def search_audit(self, q: AuditQuery) -> SearchPage:
        """``AuditEvent?…`` (``gateway.store.audit_search``), for the platform only."""
        with self._audited("search-type", "AuditEvent"):
            if not self._audit_trail_visible():
                return SearchPage([], [], 0, None, None)
            if q.summary == "count":
                return SearchPage([], [], audit_search.count(self.conn, q), None, None)
            # a later page or a date poll: not past the oldest write still in flight, whose
            # events may commit after this read (PostgreSQL; see visible_horizon)
            horizon = self.store.visible_horizon(self.conn) \
                if q.cursor is not None or q.dated else None
            rows, cursor = audit_search.page(self.conn, q, horizon)
            total = None
            if q.total_mode in ("accurate", "estimate") or q.count == 0:
                total = audit_search.count(self.conn, q)
            elif cursor is None and q.cursor is None:
                total = len(rows)
            return SearchPage([_audit_stored(r) for r in rows], [], total, cursor, None)

    def audit_history(self, event_id: str | None, *, count: int, since: int | None = None,
                      offset: int = 0) -> tuple[list[Stored], bool]:
        """``AuditEvent/{id}/_history`` (its one version) and ``AuditEvent/_history`` (every
        event, newest first), as :meth:`history` answers for resources."""
        interaction = "history-instance" if event_id else "history-type"
        with self._audited(interaction, "AuditEvent", event_id):
            if event_id is not None:
                row = self._audit_event(event_id)
                rows = [row] if since is None or row.recorded >= since else []
                return ([_audit_stored(r) for r in rows[offset:offset + count]],
                        len(rows) > offset + count)
            if not self._audit_trail_visible():
                return [], False
            rows, more = audit_store.newest_first(self.conn, count=count, offset=offset,
                                                  since=since)
            return [_audit_stored(r) for r in rows], more

    def update(self, resource: dict[str, Any], res_id: str, *, if_match: int | None = None,
               method: str = "PUT") -> tuple[Stored, bool]:
        """Replace ``resource`` as a new version (create it under ``res_id`` if it is new).
        Returns (stored, created)."""
        res_type = resource["resourceType"]
        interaction = "update" if method == "PUT" else "patch"
        with self._audited(interaction, res_type, res_id):
            current = self._row(res_type, res_id, lock=True)
            hidden = None
            if current is None:
                hidden = self._row(res_type, res_id, policy=False)
                if hidden is not None:  # hidden, or created by a commit since the first look
                    current = self._row(res_type, res_id, lock=True)
            if current is None:
                if hidden is not None:
                    if if_match is not None and if_match != hidden.version:
                        # e.g. a claim race: another CBO took the Task, which so left this
                        # caller's compartment; its If-Match (from its own read) is stale
                        raise PreconditionFailed(
                            f"{res_type}/{res_id} changed since you read it; it is no longer "
                            "yours to change", "If-Match")
                    raise Hidden(f"{res_type}/{res_id} is not known", f"{res_type}.id")
                if if_match is not None:
                    raise PreconditionFailed(
                        f"{res_type}/{res_id} does not exist, so If-Match cannot hold",
                        "If-Match")
                self.ctx.policy.allow_update_as_create()
                return self._create(resource, res_id), True
            if if_match is not None and if_match != current.version:
                raise PreconditionFailed(
                    f"{res_type}/{res_id} is at version {current.version}, not {if_match}: "
                    "someone changed it since you read it. Read it again and retry.",
                    "If-Match", headers={"ETag": f'W/"{current.version}"'})
            if current.deleted:
                self.ctx.policy.allow_update_as_create()
            resource = self._prepared(interaction, resource, current)
            self.ctx.policy.check_write(self, interaction, res_type, current,
                                        {**resource, "id": res_id})
            for hook in self.store.hooks:
                self.warnings.extend(
                    hook.before_write(self, interaction, res_type, current, resource))
            if not current.deleted and _same_content(current.body, resource):
                # a re-sent or no-op update: no new version, so no poller sees a change that
                # is not one (the caller gets the current version back)
                return current, False
            version = current.version + 1
            body = self._stamp(resource, res_id, version)
            index = extract(body, self.ctx.base_url)
            write_version(self.conn, self.store.dialect, current.rid, res_type, version,
                          self.now, body, method, index,
                          grants.direct_grants(res_type, index, current.author_org))
            grants.relay_marks(self._marks, res_type, res_id,
                               None if current.deleted else current.body, body,
                               self.ctx.base_url)
            stored = Stored(current.rid, res_type, res_id, version, self.now, False, body,
                            current.author_org)
            for hook in self.store.hooks:
                hook.after_write(self, interaction, res_type, current, stored)
            return stored, current.deleted

    def delete(self, res_type: str, res_id: str) -> Stored | None:
        """Delete (a versioned tombstone). Deleting twice is not an error."""
        with self._audited("delete", res_type, res_id):
            current = self._row(res_type, res_id, lock=True)
            if current is None:
                raise NotFound(f"{res_type}/{res_id} is not known", f"{res_type}.id")
            if current.deleted:
                return None
            self.ctx.policy.check_write(self, "delete", res_type, current, None)
            version = current.version + 1
            write_version(self.conn, self.store.dialect, current.rid, res_type, version,
                          self.now, None, "DELETE", None)
            grants.relay_marks(self._marks, res_type, res_id, current.body, None,
                               self.ctx.base_url)
            return Stored(current.rid, res_type, res_id, version, self.now, True, None,
                          current.author_org)

    def lock(self, key: str) -> None:
        """A transaction-scoped lock on ``key`` (PostgreSQL advisory lock; SQLite writers are
        already serialized by ``BEGIN IMMEDIATE``)."""
        if self.store.dialect == "postgresql":
            self.conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (_lock_key(key),))

    # -- search ----------------------------------------------------------------------------
    def parse_search(self, res_type: str, params: list[tuple[str, str]], *,
                     lenient: bool = False) -> SearchQuery:
        return QueryBuilder(res_type, self.ctx.base_url, self.ctx.policy.visible).parse(
            params, lenient=lenient, default_count=self.store.default_page_size,
            max_count=self.store.max_page_size)

    def _base_stmt(self, q: SearchQuery, *cols):
        stmt = select(*cols).where(resources.c.res_type == q.res_type,
                                   resources.c.deleted == false(), *q.conditions)
        vis = self._visible(q.res_type)
        return stmt.where(vis) if vis is not None else stmt

    def find(self, res_type: str, params: list[tuple[str, str]], limit: int = 2) -> list[Stored]:
        """Resources matching criteria (for conditional interactions), at most ``limit``."""
        q = self.parse_search(res_type, params)
        stmt = self._base_stmt(q, resources).order_by(resources.c.rid).limit(limit)
        return [Stored.of(r) for r in self.conn.execute(stmt)]

    def count(self, q: SearchQuery) -> int:
        stmt = self._base_stmt(q, func.count())
        return int(self.conn.execute(stmt).scalar_one())

    def search(self, q: SearchQuery) -> SearchPage:
        with self._audited("search-type", q.res_type):
            return self._search(q)

    def _search(self, q: SearchQuery) -> SearchPage:
        total: int | None = None
        if q.summary == "count":
            return SearchPage([], [], self.count(q), None, None)
        stmt = self._base_stmt(q, resources).order_by(*sort_columns(q))
        probe = None
        if q.polls_last_updated or q.cursor is not None:
            if q.keyset and not (q.sort and q.sort[0].descending):
                # In _lastUpdated order the rows at or past the horizon are the end of the
                # page: select the horizon with the page and cut them off here, which is the
                # same page as with the condition in SQL, without a round trip of its own.
                probe = self.store.horizon_probe()
                if probe is not None:
                    stmt = stmt.add_columns(probe[1].label("inflight_oldest"))
            else:
                horizon = self.store.visible_horizon(self.conn)
                if horizon is not None:
                    stmt = stmt.where(resources.c.last_updated < horizon)
        if q.keyset:
            stmt = apply_cursor(stmt, q)
        else:
            stmt = stmt.offset(q.offset)
        rows = list(self.conn.execute(stmt.limit(q.count + 1))) if q.count > 0 else []
        if probe is not None and rows:
            horizon = horizon_of(probe[0], rows[0].inflight_oldest)
            rows = [r for r in rows if r.last_updated < horizon]
        more = len(rows) > q.count
        rows = rows[: q.count]
        matches = [Stored.of(r) for r in rows]
        if q.total_mode in ("accurate", "estimate") or q.count == 0:
            total = self.count(q)
        elif not more and q.cursor is None and q.offset == 0:
            total = len(matches)
        next_cursor = next_offset = None
        if more:
            if q.keyset:
                last = matches[-1]
                next_cursor = encode_cursor(last.last_updated, last.rid)
            else:
                next_offset = q.offset + q.count
        warnings: list[Issue] = []
        included = self._includes(q, matches, warnings) if q.includes and matches else []
        return SearchPage(matches, included, total, next_cursor, next_offset, warnings)

    def _includes(self, q: SearchQuery, matches: list[Stored],
                  warnings: list[Issue]) -> list[Stored]:
        seen = {(m.res_type, m.id) for m in matches}
        out: list[Stored] = []
        frontier = matches
        forward = [i for i in q.includes if not i.reverse]
        reverse = [i for i in q.includes if i.reverse]
        first = True
        for _depth in range(4):
            new = self._forward([i for i in forward if first or i.iterate], frontier)
            for spec in reverse:
                if not first and not spec.iterate:
                    continue
                new += self._reverse(spec, frontier, warnings)
            fresh = []
            for s in new:
                if (s.res_type, s.id) not in seen:
                    seen.add((s.res_type, s.id))
                    fresh.append(s)
            out += fresh
            if not fresh or not any(i.iterate for i in q.includes):
                break
            frontier, first = fresh, False
        return out

    def _fetch(self, targets: set[tuple[str, str]]) -> list[Stored]:
        """The current versions of ``targets`` the caller may see: one statement, a UNION ALL
        of one SELECT per type (each with its own visibility condition, planned as before)."""
        by_type: dict[str, list[str]] = {}
        for t, i in targets:
            by_type.setdefault(t, []).append(i)
        parts = []
        for t, ids in sorted(by_type.items()):
            stmt = select(resources).where(
                resources.c.res_type == t,
                _one_of(self.store.dialect, resources.c.fhir_id, sorted(ids)),
                resources.c.deleted == false())
            vis = self._visible(t)
            if vis is not None:
                stmt = stmt.where(vis)
            parts.append(stmt)
        if not parts:
            return []
        stmt = parts[0] if len(parts) == 1 else union_all(*parts)
        return [Stored.of(r) for r in self.conn.execute(stmt)]

    def _forward(self, specs: list[IncludeSpec], sources: list[Stored]) -> list[Stored]:
        """What ``sources`` point at through the forward include ``specs``: one statement for
        the references of every spec, one for the targets (not two per spec)."""
        wanted = {s.rid: s.res_type for s in sources
                  if any(s.res_type == spec.source_type for spec in specs)}
        if not wanted:
            return []
        ref = INDEX_TABLES[REFERENCE]
        stmt = select(ref.c.rid, ref.c.param, ref.c.target_type, ref.c.target_id).where(
            _one_of(self.store.dialect, ref.c.rid, sorted(wanted)),
            ref.c.param.in_(sorted({i.param for i in specs})),
            ref.c.target_id.is_not(None), ref.c.target_url.is_(None))
        targets = {(t, i) for rid, param, t, i in self.conn.execute(stmt)
                   if any(spec.param == param and spec.source_type == wanted[rid]
                          and spec.target_type in (None, t) for spec in specs)}
        return self._fetch(targets)

    def _reverse(self, spec: IncludeSpec, targets: list[Stored],
                 warnings: list[Issue]) -> list[Stored]:
        """What points at ``targets`` through ``spec``, at most ``REVINCLUDE_CAP`` resources
        per target type. FHIR has no paging of included resources (they come with the page of
        matches they belong to), and one Organization may be the owner of a million Tasks: past
        the cap the set is cut off, and a warning in the searchset's outcome says so (search
        those resources directly, e.g. ``Task?owner=…``, to page through them all)."""
        ref = INDEX_TABLES[REFERENCE]
        out: list[Stored] = []
        by_type: dict[str, list[str]] = {}
        for t in targets:
            if spec.target_type in (None, t.res_type):
                by_type.setdefault(t.res_type, []).append(t.id)
        for t, ids in by_type.items():
            stmt = select(resources).where(
                resources.c.res_type == spec.source_type, resources.c.deleted == false(),
                resources.c.rid.in_(select(ref.c.rid).where(
                    ref.c.res_type == spec.source_type, ref.c.param == spec.param,
                    ref.c.target_type == t, ref.c.target_id.in_(ids),
                    ref.c.target_url.is_(None))))
            vis = self._visible(spec.source_type)
            if vis is not None:
                stmt = stmt.where(vis)
            rows = [Stored.of(r) for r in self.conn.execute(stmt.limit(REVINCLUDE_CAP + 1))]
            if len(rows) > REVINCLUDE_CAP:
                rows = rows[:REVINCLUDE_CAP]
                name = f"{spec.source_type}:{spec.param}"
                warnings.append(Issue(
                    "warning", "too-costly",
                    f"_revinclude={name} found more than {REVINCLUDE_CAP} {spec.source_type} "
                    f"resources pointing at the {t} matches of this page; only "
                    f"{REVINCLUDE_CAP} are included. Search {spec.source_type} by "
                    f"{spec.param} to page through all of them.",
                    ["_revinclude:iterate" if spec.iterate else "_revinclude"], "1002"))
            out += rows
        return out

    # -- history ---------------------------------------------------------------------------
    def history(self, res_type: str | None, res_id: str | None, *, count: int,
                since: int | None = None, before: int | None = None,
                offset: int = 0) -> tuple[list[Stored], bool]:
        """Versions, newest first. Returns (versions, more)."""
        interaction = ("history-instance" if res_id else "history-type" if res_type
                       else "history-system")
        with self._audited(interaction, res_type, res_id):
            h = resource_history
            stmt = select(h).join(resources, resources.c.rid == h.c.rid)
            if res_type:
                stmt = stmt.where(h.c.res_type == res_type)
                vis = self._visible(res_type)
                if vis is not None:
                    stmt = stmt.where(vis)
            else:  # system history: each type through its own visibility rule; the audit
                # trail is not part of the data's history (search AuditEvent for it)
                stmt = stmt.where(h.c.res_type != "AuditEvent")
                per_type = []
                for t in RESOURCE_TYPES:
                    vis = self._visible(t)
                    if vis is None:
                        continue
                    per_type.append((t, vis))
                if per_type:
                    stmt = stmt.where(or_(
                        h.c.res_type.not_in([t for t, _ in per_type]),
                        *[and_(h.c.res_type == t, vis) for t, vis in per_type]))
            if res_id is not None:
                assert res_type
                current = self._row(res_type, res_id)
                if current is None:
                    raise NotFound(f"{res_type}/{res_id} is not known", f"{res_type}.id")
                stmt = stmt.where(h.c.rid == current.rid)
            if since is not None:
                stmt = stmt.where(h.c.last_updated >= since)
            if before is not None:
                stmt = stmt.where(h.c.last_updated < before)
            stmt = stmt.order_by(h.c.last_updated.desc(), h.c.rid.desc(), h.c.version.desc())
            rows = list(self.conn.execute(stmt.offset(offset).limit(count + 1)))
            return [Stored.of(r) for r in rows[:count]], len(rows) > count
