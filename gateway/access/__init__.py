"""Access control, in one package: who may see and change what.

- ``rules``: the rules as data (which types are public, which elements grant, what relays);
- ``grants``: compartments kept at write time (the ``access_grant`` table), so that a
  visibility check is one index probe per candidate row on both databases;
- ``policy``: ``OrgPolicy``, a caller's SMART scopes intersected with its organization's
  compartments, which the repository (``gateway.store.repository.Session``) applies to every
  interaction (``authorize``), every read and search (``visible``: an SQL condition, so
  paging, totals, includes, chains and history never leak) and every write (``check_write``).
  Handlers, the workflow and the HTTP shell never check permissions themselves.

Compartments (caller = a client acting for Organization O):

- **Task**: visible when O is its ``requester`` or ``owner`` (directly, or through a
  PractitionerRole of O as requester), or O created it; unassigned ``requested`` Tasks are also
  visible to callers whose scopes allow updating Tasks, so that they can claim them. That claim
  pool shows only the Task and its focus ServiceRequest (what service, which need; refgw leaves
  the free-text notes and supporting information out of the filler order of an unassigned
  referral): the Patient, Consent and other resources it points at open only to the CBO that
  claims it (minimum necessary: a family's data is not broadcast to every CBO).
- **ServiceRequest**: visible when O is its requester or performer, or created it, or it is the
  focus / basis of a Task visible to O.
- **Everything a visible referral points at** (Patient, Consent, Condition, Procedure,
  QuestionnaireResponse …; every reference of a Task or ServiceRequest is indexed under the
  hidden parameter ``_ref``) and everything O created. Hence a Task or ServiceRequest a client
  writes may only point at what that client can see itself (naming an id must not be a way to
  read it). A QuestionnaireResponse is about a person: besides its creator, only who may see
  a referral naming it (``ServiceRequest.supportingInfo``, ``Task.input`` / ``output`` …)
  sees it, never the claim pool.
- **Directory** resources (Organization, Location, HealthcareService, Endpoint, Practitioner,
  PractitionerRole) are visible to every authenticated caller; writable by their own org.
- **Definitional** resources (Questionnaire: a form, about nobody) are visible to every
  authenticated caller; any organization with the scope may create one, and only the
  organization that created it (or the platform) may change or delete it.
- **AuditEvent**: platform only. **Subscription**: its creator only.
- A platform client (bound to refgw itself) sees and may change everything its scopes allow.

A resource outside the compartment answers 404, like one that does not exist.

Why kept at write time: before (issue 11), every search re-derived the compartment through
nested probes of the index tables (a Patient through every Task and ServiceRequest pointing at
it, each through its own requester, owner, roles and the claim pool), 4-18x the cost of the
bare query at p50 on 1M Tasks, and SQLite, whose parser could not nest that form as deep as a
chained search needs, used a second form of the same rules. The grants are one form, for both.
"""