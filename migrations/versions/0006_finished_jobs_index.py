"""index for the estimate's history: completed jobs, newest finished first

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 13:30:00

`ix_jobs_estimate_history` (finished_at) of completed jobs with an estimate (partial): the estimate reads
the newest of them (`ORDER BY finished_at DESC LIMIT 200`) and, at every create, the newest one's
finished_at (whether the history a server keeps is still current). Without it both were a scan and a sort
of the whole jobs table; with a plain (status, finished_at) index the second still walked every completed
job made before estimates existed.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The estimate's history (app.services.estimates): kept here, as migrations do not import the app.
WHERE = "status = 'completed' AND estimate IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_estimate_history",
            ["finished_at"],
            unique=False,
            postgresql_where=sa.text(WHERE),
            sqlite_where=sa.text(WHERE),
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_estimate_history")
