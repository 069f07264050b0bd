"""indexes for the API's hot paths and admission: list pages per tenant, the queue in line order

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-01 10:10:00

- `ix_jobs_queue_order` (status, queued_at, id): admission reads the queue a page at a time in line order
  (queued_at, id) from it; it replaces `ix_jobs_status_queued_at` (status, queued_at), whose order left
  ties unsorted. `ix_jobs_queue_by_tenant` (status, tenant_id, queued_at, id): each tenant's queue in line
  order, so admission skips tenants at their limit without walking their queued rows.
- `ix_jobs_tenant_created` (tenant_id, created_at, id): a tenant's newest jobs first (the first list page,
  and keyset pages after it) without sorting; it makes `ix_jobs_tenant_id` redundant.
- `ix_jobs_tenant_status_created` / `ix_jobs_tenant_teacher_created`: the same, filtered by status or
  teacher.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_queue_order", ["status", "queued_at", "id"], unique=False)
        batch_op.create_index(
            "ix_jobs_queue_by_tenant", ["status", "tenant_id", "queued_at", "id"], unique=False
        )
        batch_op.create_index("ix_jobs_tenant_created", ["tenant_id", "created_at", "id"], unique=False)
        batch_op.create_index(
            "ix_jobs_tenant_status_created", ["tenant_id", "status", "created_at", "id"], unique=False
        )
        batch_op.create_index(
            "ix_jobs_tenant_teacher_created",
            ["tenant_id", "teacher_model_name", "created_at", "id"],
            unique=False,
        )
        batch_op.drop_index("ix_jobs_status_queued_at")
        batch_op.drop_index("ix_jobs_tenant_id")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_id", ["tenant_id"], unique=False)
        batch_op.create_index("ix_jobs_status_queued_at", ["status", "queued_at"], unique=False)
        batch_op.drop_index("ix_jobs_tenant_teacher_created")
        batch_op.drop_index("ix_jobs_tenant_status_created")
        batch_op.drop_index("ix_jobs_tenant_created")
        batch_op.drop_index("ix_jobs_queue_by_tenant")
        batch_op.drop_index("ix_jobs_queue_order")
