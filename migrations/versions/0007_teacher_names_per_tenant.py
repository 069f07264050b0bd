"""teacher names unique per owner, not across tenants

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 19:00:00

Until now `teachers.name` was unique over every tenant. A registration that picked a name another tenant had
taken got a 409: it told one tenant that another had registered that name (an oracle across tenants), and
two teams could not both call their teacher `bert-base-sst2`. The unique constraint on the name is replaced
by `uq_teachers_owner_name` on (coalesce(tenant_id, ''), name): one name per tenant, and the global (seeded)
teachers, whose tenant_id is NULL, one owner among them. The API keeps a tenant from registering a name a
global teacher has, so a name a tenant can see means one teacher.

Downgrade restores the global unique constraint; it fails while two tenants share a name (rename one first).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's UNIQUE in CREATE TABLE (migration 0001) has no name; batch mode reflects it under this one.
_SQLITE_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
_OWNER_NAME = "uq_teachers_owner_name"


def _name_constraint(bind: sa.engine.Connection) -> str | None:
    """The name of the unique constraint on teachers(name) alone, as the database calls it."""
    for constraint in sa.inspect(bind).get_unique_constraints("teachers"):
        if constraint["column_names"] == ["name"]:
            return constraint["name"] or "uq_teachers_name"
    return None


def upgrade() -> None:
    bind = op.get_bind()
    constraint = _name_constraint(bind)
    if constraint is not None:
        if bind.dialect.name == "sqlite":
            with op.batch_alter_table("teachers", naming_convention=_SQLITE_NAMING) as batch_op:
                batch_op.drop_constraint(constraint, type_="unique")
        else:
            op.drop_constraint(constraint, "teachers", type_="unique")
    op.create_index(_OWNER_NAME, "teachers", [sa.text("coalesce(tenant_id, '')"), "name"], unique=True)


def downgrade() -> None:
    shared = op.get_bind().scalars(
        sa.text("SELECT name FROM teachers GROUP BY name HAVING count(*) > 1 ORDER BY name")
    )
    names = list(shared)
    if names:  # checked before anything changes (SQLite runs DDL outside a transaction)
        raise RuntimeError(
            f"teacher names used by more than one owner: {', '.join(names)}; rename or delete all but one "
            "of each before downgrading below 0007"
        )
    op.drop_index(_OWNER_NAME, table_name="teachers")
    with op.batch_alter_table("teachers", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_teachers_name", ["name"])
