"""Twin inference and review: installed model versions, the review queue with verdicts and feedback usage.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the tables."""
    op.create_table(
        "local_model",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("key_fingerprint", sa.String(80), nullable=False),
        sa.Column("promoted", sa.Boolean(), nullable=False),
        sa.Column("installed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "twin_review",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study", sa.String(64), nullable=True),
        sa.Column("pseudonym", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("arm", sa.String(16), nullable=False),
        sa.Column("quality", sa.Float(), nullable=False),
        sa.Column("copy_index", sa.Integer(), nullable=False),
        sa.Column("twin_json", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("note", sa.Text(), nullable=False, server_default=""),
        sa.Column("annotations", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("reviewer", sa.String(128), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("twin_review.id"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_in", sa.String(64), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    )
    for column in ("study", "pseudonym", "status", "used_in"):
        op.create_index(f"ix_twin_review_{column}", "twin_review", [column])


def downgrade() -> None:
    """Drop the tables."""
    op.drop_table("twin_review")
    op.drop_table("local_model")
