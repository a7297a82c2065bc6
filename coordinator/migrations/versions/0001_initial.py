"""Initial coordinator schema: users and refresh tokens, sites, studies, runs and round metrics, the hash-chained
audit log, the model registry (versions, rollouts, canary reports, site tokens) and the site reports (report keys,
drift, retraining requests, compliance checks): every table `create_tables` made before migrations existed.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def schema() -> sa.MetaData:
    """The tables as of this revision, frozen: later revisions change them with operations, never here.

    `evoclone.coordinator.migrate` also compares a database made by `create_all` before migrations existed
    against it before stamping that database at this revision.
    """
    meta = sa.MetaData()
    sa.Table(
        "audit_event", meta,
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("resource", sa.String(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prev_hash", sa.String(), nullable=False),
        sa.Column("hash", sa.String(), nullable=False, unique=True),
    )
    sa.Table(
        "coord_user", meta,
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("role", sa.Enum("sponsor", "auditor", "admin", name="role"), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("password_hash", sa.String(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_coord_user_username", "username", unique=True),
    )
    sa.Table(
        "refresh_token", meta,
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Index("ix_refresh_token_username", "username"),
    )
    sa.Table(
        "site", meta,
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("status", sa.Enum("pending", "active", "revoked", name="sitestatus"), nullable=False),
        sa.Column("csr_pem", sa.Text(), nullable=False),
        sa.Column("supernode_public_key", sa.Text(), nullable=False),
        sa.Column("supernode_fingerprint", sa.String(), nullable=False),
        sa.Column("certificate_pem", sa.Text(), nullable=True),
        sa.Column("certificate_serial", sa.String(), nullable=True),
        sa.Column("certificate_fingerprint", sa.String(), nullable=True),
        sa.Column("certificate_not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Index("ix_site_name", "name", unique=True),
        sa.Index("ix_site_status", "status"),
    )
    sa.Table(
        "study", meta,
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("indication", sa.String(256), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("arms", sa.JSON(), nullable=False),
        sa.Column("endpoints", sa.JSON(), nullable=False),
        sa.Column("inclusion_criteria", sa.JSON(), nullable=False),
        sa.Column("target_epsilon", sa.Float(), nullable=False),
        sa.Column("target_delta", sa.Float(), nullable=False),
        sa.Column("site_ids", sa.JSON(), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("status", sa.Enum("draft", "active", "paused", "closed", name="studystatus"), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_study_name", "name", unique=True),
        sa.Index("ix_study_status", "status"),
    )
    sa.Table(
        "compliance_check", meta,
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("site.id"), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("checks", sa.JSON(), nullable=False),
        sa.Column("retention_days", sa.Integer(), nullable=True),
        sa.Column("expired_data", sa.Boolean(), nullable=True),
        sa.Column("epsilon_budget", sa.Float(), nullable=True),
        sa.Column("epsilon_spent", sa.Float(), nullable=True),
        sa.Column("approved_apps", sa.JSON(), nullable=False),
        sa.Column("key_fingerprint", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_compliance_check_received_at", "received_at"),
        sa.Index("ix_compliance_check_site", "site"),
        sa.Index("ix_compliance_check_site_id", "site_id"),
    )
    sa.Table(
        "drift_report", meta,
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("site.id"), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("study.id"), nullable=True),
        sa.Column("reference_id", sa.String(128), nullable=False),
        sa.Column("reference_count", sa.Integer(), nullable=False),
        sa.Column("current_count", sa.Integer(), nullable=False),
        sa.Column("features_withheld", sa.Integer(), nullable=False),
        sa.Column("outcomes", sa.JSON(), nullable=False),
        sa.Column("flagged", sa.JSON(), nullable=False),
        sa.Column("signed", sa.Boolean(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_drift_report_received_at", "received_at"),
        sa.Index("ix_drift_report_site", "site"),
        sa.Index("ix_drift_report_site_id", "site_id"),
        sa.Index("ix_drift_report_study_id", "study_id"),
    )
    sa.Table(
        "run", meta,
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("study.id"), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("flower_run_id", sa.String(), nullable=True),
        sa.Column("status", sa.Enum("pending", "running", "finished", "failed", "stopped", name="runstatus"),
                  nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Index("ix_run_flower_run_id", "flower_run_id"),
        sa.Index("ix_run_status", "status"),
        sa.Index("ix_run_study_id", "study_id"),
    )
    sa.Table(
        "site_report_key", meta,
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("site.id"), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
    )
    sa.Table(
        "site_token", meta,
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("site.id"), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("hint", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Index("ix_site_token_site_id", "site_id"),
    )
    sa.Table(
        "drift_feature", meta,
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("feature", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("psi", sa.Float(), nullable=True),
        sa.Column("ks", sa.Float(), nullable=True),
        sa.Column("mmd", sa.Float(), nullable=True),
        sa.Column("missing_rate", sa.Float(), nullable=True),
        sa.Column("reference_missing_rate", sa.Float(), nullable=True),
        sa.Column("suppressed", sa.Boolean(), nullable=False),
        sa.Column("cells", sa.Integer(), nullable=False),
        sa.Column("suppressed_cells", sa.Integer(), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("flags", sa.JSON(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("report_id", sa.Integer(), sa.ForeignKey("drift_report.id"), nullable=False),
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("site.id"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_drift_feature_feature", "feature"),
        sa.Index("ix_drift_feature_received_at", "received_at"),
        sa.Index("ix_drift_feature_report_id", "report_id"),
        sa.Index("ix_drift_feature_site", "site"),
        sa.Index("ix_drift_feature_site_id", "site_id"),
    )
    sa.Table(
        "model_version", meta,
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("study.id"), nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("run.id"), nullable=True),
        sa.Column("version", sa.String(16), nullable=False),
        sa.Column("components", sa.JSON(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("key_fingerprint", sa.String(80), nullable=False),
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("manifest_canonical", sa.Text(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("lineage", sa.JSON(), nullable=False),
        sa.Column("status", sa.Enum("registered", "canary", "promoted", "rolled_back", "retired", name="modelstatus"),
                  nullable=False),
        sa.Column("previous_id", sa.String(), nullable=True),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_id", "number"),
        sa.UniqueConstraint("study_id", "manifest_sha256"),
        sa.Index("ix_model_version_manifest_sha256", "manifest_sha256"),
        sa.Index("ix_model_version_status", "status"),
        sa.Index("ix_model_version_study_id", "study_id"),
    )
    sa.Table(
        "retrain_request", meta,
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("study.id"), nullable=False),
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("site.id"), nullable=False),
        sa.Column("report_id", sa.Integer(), sa.ForeignKey("drift_report.id"), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("status", sa.Enum("requested", "launched", "dismissed", name="retrainstatus"), nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("run.id"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_retrain_request_status", "status"),
        sa.Index("ix_retrain_request_study_id", "study_id"),
    )
    sa.Table(
        "round_metric", meta,
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("run.id"), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("site.id"), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_round_metric_run_id", "run_id"),
    )
    sa.Table(
        "rollout", meta,
        sa.Column("sites", sa.JSON(), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("version_id", sa.String(32), sa.ForeignKey("model_version.id"), nullable=False),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("study.id"), nullable=False),
        sa.Column("started_by", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decision", sa.String(), nullable=True),
        sa.Column("decided_by", sa.String(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Index("ix_rollout_study_id", "study_id"),
        sa.Index("ix_rollout_version_id", "version_id"),
    )
    sa.Table(
        "canary_report", meta,
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(16), nullable=False),
        sa.Column("candidate", sa.Float(), nullable=False),
        sa.Column("current", sa.Float(), nullable=True),
        sa.Column("patients", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollout.id"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("rollout_id", "site"),
        sa.Index("ix_canary_report_rollout_id", "rollout_id"),
    )
    return meta


def upgrade() -> None:
    """Create the tables (and, on PostgreSQL, their enum types)."""
    schema().create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    """Drop the tables (and their enum types)."""
    schema().drop_all(op.get_bind(), checkfirst=False)
