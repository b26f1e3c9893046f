"""Client registration: the client's own FHIR server, and who coordinates.

``fhir_base``: the base URL of a client's own FHIR server (``refgw clients add --fhir-base``);
absolute references into it that name the client's own Organization are stored as local
references (the Java reference implementation's EHR names its requester so).
``coordination``: ``external`` marks a platform client that is itself the Coordination Platform
app (the Gravity CP client run against refgw as its FHIR store): refgw then leaves routing the
platform's referrals to it. NULL for both means no such setting.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("auth_clients") as batch:
        batch.add_column(sa.Column("fhir_base", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("coordination", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("auth_clients") as batch:
        batch.drop_column("coordination")
        batch.drop_column("fhir_base")
