"""Initial site schema: wrapped data keys, encrypted patients, quarantine.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the tables."""
    op.create_table(
        "data_key",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("master_id", sa.String(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "patient",
        sa.Column("pseudonym", sa.String(), primary_key=True),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("n_events", sa.Integer(), nullable=False),
        sa.Column("content_mac", sa.String(), nullable=False),
        sa.Column("data_key_id", sa.Integer(), sa.ForeignKey("data_key.id"), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_patient_site", "patient", ["site"])
    op.create_index("ix_patient_content_mac", "patient", ["content_mac"])
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("batch", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("location", sa.String(), nullable=False),
        sa.Column("field", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_quarantine_batch", "quarantine", ["batch"])


def downgrade() -> None:
    """Drop the tables."""
    op.drop_table("quarantine")
    op.drop_table("patient")
    op.drop_table("data_key")
